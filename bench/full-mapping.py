# SPDX-License-Identifier: GPL-2.0-or-later
"""full-mapping.py XML BLOCKS: rewrite a thin_dump XML of a pool with one
thin device so that the device maps blocks 0..BLOCKS-1 to data blocks
0..BLOCKS-1 (one range mapping), for thin_restore: a volume with every
block mapped, made without writing its data (run-fuse.sh, run-diff.sh)."""
import re
import sys

path, n = sys.argv[1], int(sys.argv[2])
x = open(path).read()
if x.count("<device ") != 1:
    sys.exit("full-mapping: expected one device in the dump")
x = re.sub(r'(<device [^>]*mapped_blocks=")\d+(")', r"\g<1>%d\g<2>" % n, x)
x = re.sub(r"(<device [^>]*>).*?(</device>)",
           r'\g<1>\n<range_mapping origin_begin="0" data_begin="0" length="%d" time="0"/>\n\g<2>' % n,
           x, flags=re.S)
open(path, "w").write(x)
