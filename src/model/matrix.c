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

int kvd_matrix_panels(int rows)
{
    return (rows + KVD_PANEL_ROWS - 1) / KVD_PANEL_ROWS;
}

size_t kvd_matrix_packed_bytes(kvd_dtype dtype, int rows, int cols)
{
    return (size_t)kvd_matrix_panels(rows) * KVD_PANEL_ROWS * (size_t)cols * kvd_dtype_size(dtype);
}

/* Offset in elements of W[row][k] within the packed data: 32 elements per (panel, k);
 * bf16 pairs rows j and j + 16 of a panel in one 32-bit word. */
static size_t packed_index(kvd_dtype dtype, int cols, int row, int k)
{
    size_t base = ((size_t)(row / KVD_PANEL_ROWS) * (size_t)cols + (size_t)k) * KVD_PANEL_ROWS;
    int j = row % KVD_PANEL_ROWS;
    if (dtype == KVD_DTYPE_BF16)
        return base + (size_t)(j % 16) * 2 + (size_t)(j / 16);
    return base + (size_t)j;
}

void kvd_matrix_pack(void *dst, kvd_dtype dtype, int rows, int cols, const void *src,
                     int panel_begin, int panel_end)
{
    size_t esize = kvd_dtype_size(dtype);
    size_t row_bytes = (size_t)cols * esize;
    const uint8_t *in = src;
    uint8_t *out = (uint8_t *)dst + (size_t)panel_begin * KVD_PANEL_ROWS * row_bytes;
    for (int p = panel_begin; p < panel_end; p++) {
        /* the panel's 32 rows in packed order (bf16: j and j+16 side by side); padding
         * rows read from a zero element */
        static const uint8_t zero[4];
        const uint8_t *row[KVD_PANEL_ROWS];
        size_t row_step[KVD_PANEL_ROWS];
        for (int slot = 0; slot < KVD_PANEL_ROWS; slot++) {
            int j = dtype == KVD_DTYPE_BF16 ? (slot % 2) * 16 + slot / 2 : slot;
            int r = p * KVD_PANEL_ROWS + j;
            row[slot] = r < rows ? in + (size_t)r * row_bytes : zero;
            row_step[slot] = r < rows ? esize : 0;
        }
        for (int k = 0; k < cols; k++) {
            for (int slot = 0; slot < KVD_PANEL_ROWS; slot++) {
                if (esize == 2) /* constant sizes: the copies become plain moves */
                    memcpy(out, row[slot], 2);
                else
                    memcpy(out, row[slot], 4);
                row[slot] += row_step[slot];
                out += esize;
            }
        }
    }
}

void kvd_matrix_row(float *out, const kvd_matrix *w, int row)
{
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
