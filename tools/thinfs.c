/* SPDX-License-Identifier: GPL-2.0-or-later */
/* placeholder while the tool is written */
int main(void) { return 1; }
