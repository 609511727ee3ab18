/* SPDX-License-Identifier: GPL-2.0-or-later */
/* placeholder while the module is written */
#include "format.h"
