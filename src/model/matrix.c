/* matrix.c - the panel layout of weight matrices (see kvd_matrix in kvd_model.h).
 *
 * Packing reads the checkpoint's row-major tensor through memcpy (a safetensors
 * mapping gives no alignment) and writes each panel front to back, so the writes
 * stream and the reads are 32 sequential row streams.
 */
#include <stdint.h>
#include <string.h>

#include "kvd/kvd_half.h"
#include "kvd/kvd_model.h"
#include "kvd/kvd_quant.h"

int kvd_matrix_panels(int rows)
{
    return (rows + KVD_PANEL_ROWS - 1) / KVD_PANEL_ROWS;
}

/* Inputs a panel stores: bf16 pads to whole blocks of 32 (one AMX tile's depth). */
static size_t packed_cols(kvd_dtype dtype, int cols)
{
    return dtype == KVD_DTYPE_BF16 ? (size_t)(cols + 31) / 32 * 32 : (size_t)cols;
}

size_t kvd_matrix_packed_bytes(kvd_dtype dtype, int rows, int cols)
{
    if (kvd_dtype_is_quantized(dtype))
        return kvd_quant_packed_bytes(dtype, rows, cols);
    return (size_t)kvd_matrix_panels(rows) * KVD_PANEL_ROWS * packed_cols(dtype, cols) *
           kvd_dtype_size(dtype);
}

/* Offset in elements of W[row][k] within the packed data: 32 elements per (panel, k);
 * bf16 takes inputs in pairs, 64 elements per (panel, pair), row j's pair in word j. */
static size_t packed_index(kvd_dtype dtype, int cols, int row, int k)
{
    size_t panel_start = (size_t)(row / KVD_PANEL_ROWS) * packed_cols(dtype, cols) * KVD_PANEL_ROWS;
    size_t j = (size_t)(row % KVD_PANEL_ROWS);
    if (dtype == KVD_DTYPE_BF16)
        return panel_start + (size_t)(k / 2) * 2 * KVD_PANEL_ROWS + j * 2 + (size_t)(k % 2);
    return panel_start + (size_t)k * KVD_PANEL_ROWS + j;
}

/* A bf16 subnormal becomes a zero of its sign: the instruction the bf16 products are
 * defined by (AMX's TDPBF16PS) reads subnormal inputs as zero, and flushing here lets
 * every kernel build multiply the stored value as it is. */
static uint16_t bf16_flush_subnormal(uint16_t h)
{
    return (h & 0x7f80u) == 0 ? (uint16_t)(h & 0x8000u) : h;
}

void kvd_matrix_pack(void *dst, kvd_dtype dtype, int rows, int cols, const void *src,
                     int panel_begin, int panel_end)
{
    if (kvd_dtype_is_quantized(dtype)) {
        kvd_quant_pack(dst, dtype, rows, cols, src, panel_begin, panel_end);
        return;
    }
    size_t esize = kvd_dtype_size(dtype);
    size_t row_bytes = (size_t)cols * esize;
    size_t panel_bytes = KVD_PANEL_ROWS * packed_cols(dtype, cols) * esize;
    const uint8_t *in = src;
    uint8_t *out = (uint8_t *)dst + (size_t)panel_begin * panel_bytes;
    for (int p = panel_begin; p < panel_end; p++) {
        /* padding rows read from a zero element */
        static const uint8_t zero[4];
        const uint8_t *row[KVD_PANEL_ROWS];
        size_t row_step[KVD_PANEL_ROWS];
        for (int j = 0; j < KVD_PANEL_ROWS; j++) {
            int r = p * KVD_PANEL_ROWS + j;
            row[j] = r < rows ? in + (size_t)r * row_bytes : zero;
            row_step[j] = r < rows ? esize : 0;
        }
        if (dtype == KVD_DTYPE_BF16) {
            int padded = (int)packed_cols(dtype, cols);
            for (int k = 0; k < padded; k += 2) {
                for (int j = 0; j < KVD_PANEL_ROWS; j++) {
                    uint16_t pair[2] = {0, 0}; /* inputs past cols are zero */
                    for (int e = 0; e < 2 && k + e < cols; e++) {
                        memcpy(&pair[e], row[j], 2);
                        row[j] += row_step[j];
                    }
                    pair[0] = bf16_flush_subnormal(pair[0]);
                    pair[1] = bf16_flush_subnormal(pair[1]);
                    memcpy(out, pair, sizeof pair);
                    out += sizeof pair;
                }
            }
            continue;
        }
        for (int k = 0; k < cols; k++) {
            for (int j = 0; j < KVD_PANEL_ROWS; j++) {
                if (esize == 2) /* constant sizes: the copies become plain moves */
                    memcpy(out, row[j], 2);
                else
                    memcpy(out, row[j], 4);
                row[j] += row_step[j];
                out += esize;
            }
        }
    }
}

void kvd_matrix_row(float *out, const kvd_matrix *w, int row)
{
    if (kvd_dtype_is_quantized(w->dtype)) {
        kvd_quant_matrix_row(out, w, row);
        return;
    }
    size_t esize = kvd_dtype_size(w->dtype);
    const uint8_t *data = w->data;
    for (int k = 0; k < w->cols; k++) {
        const uint8_t *e = data + packed_index(w->dtype, w->cols, row, k) * esize;
        if (w->dtype == KVD_DTYPE_F32) {
            memcpy(&out[k], e, sizeof(float));
        } else {
            uint16_t h;
            memcpy(&h, e, sizeof h);
            out[k] = w->dtype == KVD_DTYPE_BF16 ? kvd_bf16_to_f32(h) : kvd_f16_to_f32(h);
        }
    }
}
