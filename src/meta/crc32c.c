/* SPDX-License-Identifier: GPL-2.0-or-later */
#include "crc32c.h"

#include "format.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <nmmintrin.h>
#endif

/* Slice-by-1 table, built once on first use (idempotent, so a race is harmless). */
static uint32_t crc_table[256];
static int crc_table_ready;

static void build_table(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
		crc_table[i] = c;
	}
	__atomic_store_n(&crc_table_ready, 1, __ATOMIC_RELEASE);
}

static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t len)
{
	if (!__atomic_load_n(&crc_table_ready, __ATOMIC_ACQUIRE))
		build_table();
	while (len--)
		crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
	return crc;
}

#if defined(__x86_64__)
/* Every checksum of every metadata read goes through here; SSE4.2 makes it ~10x cheaper. */
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p, size_t len)
{
	uint64_t c = crc;
	while (len >= 8) {
		uint64_t v;
		memcpy(&v, p, 8);
		c = _mm_crc32_u64(c, v);
		p += 8;
		len -= 8;
	}
	crc = (uint32_t)c;
	while (len--)
		crc = _mm_crc32_u8(crc, *p++);
	return crc;
}

static int have_sse42(void)
{
	static int cached = -1;
	int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
	if (v < 0) {
		unsigned a, b, c, d;
		v = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_SSE4_2);
		__atomic_store_n(&cached, v, __ATOMIC_RELAXED);
	}
	return v;
}
#endif

uint32_t tfs_crc32c(uint32_t seed, const void *buf, size_t len)
{
#if defined(__x86_64__)
	if (have_sse42())
		return crc_hw(seed, buf, len);
#endif
	return crc_sw(seed, buf, len);
}

uint32_t tfs_block_csum(const void *block, uint32_t salt)
{
	return tfs_crc32c(0xFFFFFFFFu, (const uint8_t *)block + 4, TFS_BLOCK_SIZE - 4) ^ salt;
}
