/* qpack.c - the packed layout of quantized weight matrices (see quant_internal.h): tiles
 * of 16 rows x one ggml block, laid out for VPDPBUSD, and the way back to a row's floats.
 *
 * Tile tables (bytes, in order; c = row in the group):
 *   Q8_0: 8 B8 vectors (512) | d fp16 [16] (32)
 *   Q4_0: 4 N4 vectors (256) | d [16]
 *   Q5_0: 4 N4 (256) | fifth bits (64) | d [16]
 *   Q4_K: 32 N4 (2048) | scale [8 sub][16] (128) | min [8][16] (128) | d [16] | dmin [16]
 *   Q5_K: 32 N4 (2048) | fifth bits, 8 x 64 (512) | scale (128) | min (128) | d | dmin
 *   Q6_K: 32 N4 (2048) | top bits, 16 x 64 (1024) | scale int8 [16 sub][16] (256) | d [16]
 *   Q8_K: 64 B8 vectors (4096) | d float [16] (64)
 * Only Q4_K/Q5_K grow (the 6-bit scales and mins spread to bytes, +2.8% / +2.3%), so a
 * product reads them with one widening load.
 */
#include <stdlib.h>
#include <string.h>

#include "kvd/kvd_quant.h"
#include "quant_internal.h"

typedef struct tile_shape {
    int values;     /* inputs per block */
    int code_bytes; /* B8 or N4 vectors */
    bool nibbles;
    int high_bytes; /* fifth bits (Q5) or top two bits (Q6_K) */
    int sc_bytes;   /* sub-block scales (and as many mins for Q4_K/Q5_K) */
    bool has_min;
    int d_bytes;    /* per row: 2 (fp16 d), 4 (fp16 d + dmin, or float d) */
} tile_shape;

static tile_shape shape_of(kvd_dtype dtype)
{
    switch (dtype) {
    case KVD_DTYPE_Q8_0: return (tile_shape){32, 512, false, 0, 0, false, 2};
    case KVD_DTYPE_Q4_0: return (tile_shape){32, 256, true, 0, 0, false, 2};
    case KVD_DTYPE_Q5_0: return (tile_shape){32, 256, true, 64, 0, false, 2};
    case KVD_DTYPE_Q4_K: return (tile_shape){256, 2048, true, 0, 128, true, 4};
    case KVD_DTYPE_Q5_K: return (tile_shape){256, 2048, true, 512, 128, true, 4};
    case KVD_DTYPE_Q6_K: return (tile_shape){256, 2048, true, 1024, 256, false, 2};
    case KVD_DTYPE_Q8_K: return (tile_shape){256, 4096, false, 0, 0, false, 4};
    default: return (tile_shape){0, 0, false, 0, 0, false, 0};
    }
}

size_t kvd_qtile_bytes(kvd_dtype dtype)
{
    tile_shape s = shape_of(dtype);
    return (size_t)s.code_bytes + (size_t)s.high_bytes + (size_t)s.sc_bytes * (s.has_min ? 2 : 1) +
           (size_t)KVD_QGROUP_ROWS * (size_t)s.d_bytes;
}

/* Byte of input k's low bits (and, for nibbles, whether it is the high nibble). */
static size_t code_byte(const tile_shape *s, int c, int k, int *high_nibble)
{
    if (!s->nibbles) {
        *high_nibble = 0;
        return (size_t)(k / 4) * 64 + (size_t)(4 * c + k % 4);
    }
    int within = k % 8;
    *high_nibble = within / 4;
    return (size_t)(k / 8) * 64 + (size_t)(4 * c + within % 4);
}

/* Byte and bit of input k's bits above the nibble. */
static size_t high_byte(kvd_dtype dtype, int c, int k, int *shift)
{
    int within = k % 8, i = within % 4, half = within / 4;
    if (dtype == KVD_DTYPE_Q6_K) {
        *shift = 2 * (2 * (k % 16 / 8) + half);
        return (size_t)(k / 16) * 64 + (size_t)(4 * c + i);
    }
    *shift = 4 * half + k % 32 / 8;
    return (size_t)(k / 32) * 64 + (size_t)(4 * c + i);
}

void kvd_qtile_put(kvd_dtype dtype, uint8_t *tile, int c, const kvd_qblock *b)
{
    tile_shape s = shape_of(dtype);
    uint8_t *high = tile + s.code_bytes;
    uint8_t *sc = high + s.high_bytes;
    uint8_t *d = sc + s.sc_bytes * (s.has_min ? 2 : 1);
    for (int k = 0; k < s.values; k++) {
        int hn, shift;
        size_t at = code_byte(&s, c, k, &hn);
        if (!s.nibbles) {
            tile[at] = b->code[k];
            continue;
        }
        tile[at] = (uint8_t)((tile[at] & (hn ? 0x0F : 0xF0)) | (b->code[k] & 0xF) << (4 * hn));
        if (s.high_bytes) {
            size_t hb = high_byte(dtype, c, k, &shift);
            unsigned width_mask = dtype == KVD_DTYPE_Q6_K ? 3u : 1u;
            high[hb] = (uint8_t)((high[hb] & ~(width_mask << shift)) |
                                 ((unsigned)(b->code[k] >> 4) & width_mask) << shift);
        }
    }
    int subs = s.sc_bytes / KVD_QGROUP_ROWS;
    for (int j = 0; j < subs; j++) {
        sc[j * KVD_QGROUP_ROWS + c] = b->sc[j];
        if (s.has_min)
            sc[s.sc_bytes + j * KVD_QGROUP_ROWS + c] = b->mn[j];
    }
    if (dtype == KVD_DTYPE_Q8_K) {
        memcpy(d + 4 * c, &b->d32, 4);
    } else {
        memcpy(d + 2 * c, &b->d, 2);
        if (s.has_min)
            memcpy(d + 2 * KVD_QGROUP_ROWS + 2 * c, &b->dmin, 2);
    }
}

void kvd_qtile_get(kvd_dtype dtype, const uint8_t *tile, int c, kvd_qblock *b)
{
    /* the inverse of kvd_qtile_put, vector by vector (the scalar product reads every
     * weight through here) */
    tile_shape s = shape_of(dtype);
    const uint8_t *high = tile + s.code_bytes;
    const uint8_t *sc = high + s.high_bytes;
    const uint8_t *d = sc + s.sc_bytes * (s.has_min ? 2 : 1);
    memset(b, 0, sizeof *b);
    const uint8_t *lane = tile + 4 * c;
    if (!s.nibbles) {
        for (int t = 0; t < s.values / 4; t++)
            memcpy(b->code + 4 * t, lane + 64 * t, 4);
    } else {
        for (int t = 0; t < s.values / 8; t++) {
            for (int i = 0; i < 4; i++) {
                uint8_t byte = lane[64 * t + i];
                b->code[8 * t + i] = byte & 0xF;
                b->code[8 * t + 4 + i] = byte >> 4;
            }
        }
    }
    if (dtype == KVD_DTYPE_Q5_0 || dtype == KVD_DTYPE_Q5_K) {
        for (int g = 0; g < s.values / 32; g++) {
            for (int i = 0; i < 4; i++) {
                unsigned byte = high[64 * g + 4 * c + i];
                for (int t = 0; t < 4; t++) {
                    b->code[32 * g + 8 * t + i] |= (uint8_t)((byte >> t & 1u) << 4);
                    b->code[32 * g + 8 * t + 4 + i] |= (uint8_t)((byte >> (4 + t) & 1u) << 4);
                }
            }
        }
    } else if (dtype == KVD_DTYPE_Q6_K) {
        for (int u = 0; u < 16; u++) {
            for (int i = 0; i < 4; i++) {
                unsigned byte = high[64 * u + 4 * c + i];
                for (int q = 0; q < 4; q++)
                    b->code[16 * u + 4 * q + i] |= (uint8_t)((byte >> (2 * q) & 3u) << 4);
            }
        }
    }
    int subs = s.sc_bytes / KVD_QGROUP_ROWS;
    for (int j = 0; j < subs; j++) {
        b->sc[j] = sc[j * KVD_QGROUP_ROWS + c];
        if (s.has_min)
            b->mn[j] = sc[s.sc_bytes + j * KVD_QGROUP_ROWS + c];
    }
    if (dtype == KVD_DTYPE_Q8_K) {
        memcpy(&b->d32, d + 4 * c, 4);
    } else {
        memcpy(&b->d, d + 2 * c, 2);
        if (s.has_min)
            memcpy(&b->dmin, d + 2 * KVD_QGROUP_ROWS + 2 * c, 2);
    }
}

/* ---- matrices ---------------------------------------------------------------------- */

static size_t group_bytes(kvd_dtype dtype, int cols)
{
    return (size_t)(cols / kvd_dtype_block_values(dtype)) * kvd_qtile_bytes(dtype);
}

size_t kvd_quant_packed_bytes(kvd_dtype dtype, int rows, int cols)
{
    size_t groups = (size_t)kvd_matrix_panels(rows) * (KVD_PANEL_ROWS / KVD_QGROUP_ROWS);
    return (groups * group_bytes(dtype, cols) + 63) / 64 * 64;
}

/* Packs panels [panel_begin, panel_end); row r is read at src + (r - src_first_row) rows. */
static void pack_panels(void *dst, kvd_dtype dtype, int rows, int cols, const void *src,
                        int src_first_row, int panel_begin, int panel_end)
{
    size_t row_bytes = kvd_dtype_row_bytes(dtype, cols);
    size_t block_bytes = kvd_dtype_block_bytes(dtype);
    size_t tile_bytes = kvd_qtile_bytes(dtype);
    int blocks = cols / kvd_dtype_block_values(dtype);
    const int groups_per_panel = KVD_PANEL_ROWS / KVD_QGROUP_ROWS;
    kvd_qblock b;
    for (int g = panel_begin * groups_per_panel; g < panel_end * groups_per_panel; g++) {
        uint8_t *group = (uint8_t *)dst + (size_t)g * group_bytes(dtype, cols);
        memset(group, 0, group_bytes(dtype, cols)); /* padding rows: all-zero blocks */
        for (int c = 0; c < KVD_QGROUP_ROWS; c++) {
            int r = g * KVD_QGROUP_ROWS + c;
            if (r >= rows)
                break;
            const uint8_t *row = (const uint8_t *)src + (size_t)(r - src_first_row) * row_bytes;
            for (int blk = 0; blk < blocks; blk++) {
                kvd_qblock_decode(dtype, row + (size_t)blk * block_bytes, &b);
                kvd_qtile_put(dtype, group + (size_t)blk * tile_bytes, c, &b);
            }
        }
    }
    /* a padding row's zero bytes decode as code 0; for the offset types that is not
     * value 0, but padding rows are never read back or stored to outputs */
}

void kvd_quant_pack(void *dst, kvd_dtype dtype, int rows, int cols, const void *src,
                    int panel_begin, int panel_end)
{
    pack_panels(dst, dtype, rows, cols, src, 0, panel_begin, panel_end);
}

void kvd_quant_matrix_row(float *out, const kvd_matrix *w, int row)
{
    size_t tile_bytes = kvd_qtile_bytes(w->dtype);
    int per_block = kvd_dtype_block_values(w->dtype);
    const uint8_t *group =
        (const uint8_t *)w->data + (size_t)(row / KVD_QGROUP_ROWS) * group_bytes(w->dtype, w->cols);
    kvd_qblock b;
    uint8_t block[512];
    for (int blk = 0; blk < w->cols / per_block; blk++) {
        kvd_qtile_get(w->dtype, group + (size_t)blk * tile_bytes, row % KVD_QGROUP_ROWS, &b);
        kvd_qblock_encode(w->dtype, &b, block);
        kvd_dequantize_row(w->dtype, block, out + (size_t)blk * per_block, per_block);
    }
}

int kvd_quant_matrix_create(kvd_matrix *out, kvd_dtype dtype, const kvd_matrix *src, kvd_error *err)
{
    if (!kvd_dtype_is_quantized(dtype) || src->cols % kvd_dtype_block_values(dtype) != 0 ||
        src->cols > KVD_QUANT_MAX_COLS) {
        kvd_error_set(err, KVD_EINVAL, "cannot quantize a %d x %d matrix to %s (rows must be "
                      "whole %d-value blocks, at most %d wide)", src->rows, src->cols,
                      kvd_dtype_name(dtype), kvd_dtype_block_values(dtype), KVD_QUANT_MAX_COLS);
        return KVD_EINVAL;
    }
    size_t row_bytes = kvd_dtype_row_bytes(dtype, src->cols);
    void *data = aligned_alloc(64, kvd_quant_packed_bytes(dtype, src->rows, src->cols));
    uint8_t *panel = malloc(row_bytes * KVD_PANEL_ROWS);
    float *row = malloc((size_t)src->cols * sizeof(float));
    if (!data || !panel || !row) {
        free(data);
        free(panel);
        free(row);
        kvd_error_set(err, KVD_ENOMEM, "out of memory quantizing a %d x %d matrix", src->rows, src->cols);
        return KVD_ENOMEM;
    }
    for (int p = 0; p < kvd_matrix_panels(src->rows); p++) {
        int first = p * KVD_PANEL_ROWS;
        int n = src->rows - first < KVD_PANEL_ROWS ? src->rows - first : KVD_PANEL_ROWS;
        for (int r = 0; r < n; r++) {
            kvd_matrix_row(row, src, first + r);
            kvd_quantize_row(dtype, row, panel + (size_t)r * row_bytes, src->cols);
        }
        pack_panels(data, dtype, src->rows, src->cols, panel, first, p, p + 1);
    }
    free(panel);
    free(row);
    *out = (kvd_matrix){.dtype = dtype, .rows = src->rows, .cols = src->cols, .data = data};
    return 0;
}
