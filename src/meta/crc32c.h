/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * crc32c.h - CRC-32C (Castagnoli) as the dm metadata checksums use it.
 *
 * Owns: the raw reflected CRC with caller-chosen seed and no final inversion
 * (Linux's crc32c(seed, buf, len)), and the block checksum built on it.
 * Never: knows block types beyond the salt it is handed.
 */
#ifndef TFS_META_CRC32C_H
#define TFS_META_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Raw CRC-32C update: no pre- or post-inversion beyond the seed given. */
uint32_t tfs_crc32c(uint32_t seed, const void *buf, size_t len);

/* Checksum of a 4 KiB metadata block: CRC32C_raw(block[4..4095]) ^ salt. */
uint32_t tfs_block_csum(const void *block, uint32_t salt);

#endif
