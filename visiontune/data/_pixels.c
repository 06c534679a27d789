/* The normalize stage's pixel loops in C: Pillow's Lanczos and bicubic resampling of 8-bit images, bit for
 * bit, with the inner loops vectorised (resize), and undoing PNG row filters (unfilter).
 *
 * Why: in the normalize stage Pillow's `Image.resize` was the largest single cost per image. Its 8-bit
 * resampler works one output pixel at a time with scalar multiply-adds; the arithmetic is all integer after
 * the filter weights are computed, so any order of the same additions gives the same result. This module
 * computes the weights exactly as Pillow does (same double arithmetic, same rounding to 22-bit fixed point,
 * same bounds), then runs both passes over many pixels at once so the compiler can use SIMD:
 *
 *   - horizontal pass: a block of rows is first transposed (column-major, channels interleaved), so each
 *     output column is a weighted sum of whole contiguous input columns;
 *   - vertical pass: each output row is a weighted sum of contiguous input rows.
 *
 * Like Pillow: each pass's result clipped to 8 bits; a pass whose size does not change is skipped; horizontal
 * pass first, only over the rows the vertical pass reads, unless the caller asks for the vertical pass first
 * (Pillow 13 does that when the height shrinks by more than twice as many pixels as the width). Input and
 * output are packed rows of `channels` (1 or 3) bytes per pixel. visiontune.data.resample checks the result
 * against Pillow (tests/data/test_resample.py) and falls back to Pillow where this module could not be built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION_BITS 22 /* 32 - 8 - 2, as Pillow: 8 bits of result, 2 of headroom for negative lobes */

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

static double sinc(double x) {
    if (x == 0.0) {
        return 1.0;
    }
    x = x * M_PI;
    return sin(x) / x;
}

static double lanczos(double x) { return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0; }

static double bicubic(double x) { /* a = -0.5 */
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1;
    }
    if (x < 2.0) {
        return (((x - 5) * x + 8) * x - 4) * -0.5;
    }
    return 0.0;
}

/* Fixed-point weights of every output position along one axis: `bounds` gets (first input, count) pairs,
 * `kk` ksize weights per output (unused ones 0); returns ksize, or 0 when out of memory. */
static int weights(int in_size, int out_size, int bicubic_filter, int **bounds_out, int32_t **kk_out) {
    double (*filter)(double) = bicubic_filter ? bicubic : lanczos;
    double support = bicubic_filter ? 2.0 : 3.0;
    float in0 = 0.0f, in1 = (float)in_size; /* Pillow takes the source box as floats */
    double scale = (double)(in1 - in0) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    support = support * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    int *bounds = malloc((size_t)out_size * 2 * sizeof(int));
    int32_t *kk = calloc((size_t)out_size * ksize, sizeof(int32_t));
    double *k = malloc((size_t)ksize * sizeof(double));
    if (!bounds || !kk || !k) {
        free(bounds);
        free(kk);
        free(k);
        return 0;
    }
    for (int xx = 0; xx < out_size; xx++) {
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) {
            xmin = 0;
        }
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) {
            xmax = in_size;
        }
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            double w = filter((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (int x = 0; x < xmax; x++) {
            if (ww != 0.0) {
                k[x] /= ww;
            }
            kk[(size_t)xx * ksize + x] =
                k[x] < 0 ? (int)(-0.5 + k[x] * (1 << PRECISION_BITS)) : (int)(0.5 + k[x] * (1 << PRECISION_BITS));
        }
        bounds[xx * 2] = xmin;
        bounds[xx * 2 + 1] = xmax;
    }
    free(k);
    *bounds_out = bounds;
    *kk_out = kk;
    return ksize;
}

static inline uint8_t clip8(int32_t v) {
    v >>= PRECISION_BITS;
    return v < 0 ? 0 : (v > 255 ? 255 : (uint8_t)v);
}

/* acc[i] += src[i] * w for n lanes: the loop both passes spend their time in. */
static inline void mac(int32_t *restrict acc, const uint8_t *restrict src, int32_t w, size_t n) {
    for (size_t i = 0; i < n; i++) {
        acc[i] += (int32_t)src[i] * w;
    }
}

/* The horizontal pass for `channels` known at compile time (1 or 3): inlined twice below, so that the
 * transposition and scatter loops move whole pixels instead of looping over channels. */
static inline __attribute__((always_inline)) void horizontal_rows(
    const uint8_t *src, int width, const int channels, int first_row, int rows, uint8_t *dst, int out_width,
    int ksize, const int *bounds, const int32_t *kk, uint8_t *block, int32_t *acc, int block_rows) {
    size_t in_stride = (size_t)width * channels, out_stride = (size_t)out_width * channels;
    uint8_t column[64 * 3 + 1]; /* one output column of the block, clipped (+1: read as 4-byte pixels) */
    const uint8_t *row[64];
    for (int y0 = 0; y0 < rows; y0 += block_rows) {
        int n = rows - y0 < block_rows ? rows - y0 : block_rows;
        size_t lanes = (size_t)n * channels;
        for (int r = 0; r < n; r++) {
            row[r] = src + (size_t)(first_row + y0 + r) * in_stride;
        }
        for (int x = 0; x < width; x++) { /* transpose: block[x][r] = pixel x of row r */
            uint8_t *to = block + (size_t)x * lanes;
            if (channels == 3 && x + 1 < width) {
                /* 4-byte moves for 3-byte pixels (one load and one store instead of two each): the extra byte
                 * read is the next pixel's, and the one written is overwritten by the next row's pixel or,
                 * after the last row, by the next column (`block` has 4 bytes to spare at its end). */
                for (int r = 0; r < n; r++) {
                    uint32_t pixel;
                    memcpy(&pixel, row[r] + (size_t)x * 3, 4);
                    memcpy(to + (size_t)r * 3, &pixel, 4);
                }
            } else {
                for (int r = 0; r < n; r++) {
                    memcpy(to + (size_t)r * channels, row[r] + (size_t)x * channels, channels);
                }
            }
        }
        for (int xx = 0; xx < out_width; xx++) {
            const int32_t *k = kk + (size_t)xx * ksize;
            int xmin = bounds[xx * 2], count = bounds[xx * 2 + 1];
            for (size_t i = 0; i < lanes; i++) {
                acc[i] = 1 << (PRECISION_BITS - 1);
            }
            for (int t = 0; t < count; t++) {
                mac(acc, block + (size_t)(xmin + t) * lanes, k[t], lanes);
            }
            for (size_t i = 0; i < lanes; i++) {
                column[i] = clip8(acc[i]);
            }
            uint8_t *to = dst + (size_t)y0 * out_stride + (size_t)xx * channels;
            if (channels == 3 && xx + 1 < out_width) { /* 4-byte stores: the extra byte is the next column's */
                for (int r = 0; r < n; r++) {
                    uint32_t pixel;
                    memcpy(&pixel, column + (size_t)r * 3, 4);
                    memcpy(to + (size_t)r * out_stride, &pixel, 4);
                }
            } else {
                for (int r = 0; r < n; r++) {
                    memcpy(to + (size_t)r * out_stride, column + (size_t)r * channels, channels);
                }
            }
        }
    }
}

/* Rows [first_row, first_row + rows) of `src` resized to `out_width` into `dst`, `block_rows` rows at a time
 * (block_rows <= 64): each block is transposed into `block` (width x block_rows pixels), so an output pixel
 * column is a weighted sum of contiguous input columns: one vectorised loop over the block's rows. */
VECTOR_CLONES
static void horizontal(const uint8_t *src, int width, int channels, int first_row, int rows, uint8_t *dst,
                       int out_width, int ksize, const int *bounds, const int32_t *kk, uint8_t *block,
                       int32_t *acc, int block_rows) {
    if (channels == 1) {
        horizontal_rows(src, width, 1, first_row, rows, dst, out_width, ksize, bounds, kk, block, acc, block_rows);
    } else {
        horizontal_rows(src, width, 3, first_row, rows, dst, out_width, ksize, bounds, kk, block, acc, block_rows);
    }
}

VECTOR_CLONES
static void vertical(const uint8_t *src, int width, int channels, uint8_t *dst, int out_height, int ksize,
                     const int *bounds, const int32_t *kk, int32_t *acc) {
    size_t stride = (size_t)width * channels;
    for (int yy = 0; yy < out_height; yy++) {
        const int32_t *k = kk + (size_t)yy * ksize;
        int ymin = bounds[yy * 2], count = bounds[yy * 2 + 1];
        for (size_t i = 0; i < stride; i++) {
            acc[i] = 1 << (PRECISION_BITS - 1);
        }
        for (int t = 0; t < count; t++) {
            mac(acc, src + (size_t)(ymin + t) * stride, k[t], stride);
        }
        uint8_t *out = dst + (size_t)yy * stride;
        for (size_t i = 0; i < stride; i++) {
            out[i] = clip8(acc[i]);
        }
    }
}

/* The whole resize; 0 on success, -1 when out of memory. `vertical_first`: run the vertical pass first (what
 * Pillow 13 does when the height shrinks by more than twice as many pixels as the width). */
static int resize(const uint8_t *src, int width, int height, int channels, uint8_t *dst, int out_width,
                  int out_height, int bicubic_filter, int vertical_first) {
    int *bounds_v = NULL, *bounds_h = NULL;
    int32_t *kk_v = NULL, *kk_h = NULL, *acc = NULL;
    uint8_t *tmp = NULL, *block = NULL;
    int status = -1;
    int need_h = out_width != width, need_v = out_height != height;
    int block_rows = channels == 1 ? 64 : 16; /* 64 or 48 lanes per column in the horizontal pass */
    int ksize_v = need_v ? weights(height, out_height, bicubic_filter, &bounds_v, &kk_v) : 1; /* (1: no pass) */
    int ksize_h = need_h ? weights(width, out_width, bicubic_filter, &bounds_h, &kk_h) : 1;
    int acc_pixels = block_rows; /* sums in flight: a block's column, or a whole row in the vertical pass */
    acc_pixels = width > acc_pixels ? width : acc_pixels;
    acc_pixels = out_width > acc_pixels ? out_width : acc_pixels;
    acc = malloc((size_t)acc_pixels * channels * sizeof(int32_t));
    block = need_h ? malloc((size_t)width * block_rows * channels + 4) : NULL;
    if (!ksize_v || !ksize_h || !acc || (need_h && !block)) {
        goto done;
    }
    if (need_h && need_v && vertical_first) {
        if (!(tmp = malloc((size_t)width * out_height * channels))) {
            goto done;
        }
        vertical(src, width, channels, tmp, out_height, ksize_v, bounds_v, kk_v, acc);
        horizontal(tmp, width, channels, 0, out_height, dst, out_width, ksize_h, bounds_h, kk_h, block, acc,
                   block_rows);
    } else if (need_h && need_v) { /* only the rows the vertical pass reads go through the horizontal one */
        int first = bounds_v[0], last = bounds_v[out_height * 2 - 2] + bounds_v[out_height * 2 - 1];
        if (!(tmp = malloc((size_t)(last - first) * out_width * channels))) {
            goto done;
        }
        horizontal(src, width, channels, first, last - first, tmp, out_width, ksize_h, bounds_h, kk_h, block, acc,
                   block_rows);
        for (int i = 0; i < out_height; i++) {
            bounds_v[i * 2] -= first;
        }
        vertical(tmp, out_width, channels, dst, out_height, ksize_v, bounds_v, kk_v, acc);
    } else if (need_h) {
        horizontal(src, width, channels, 0, height, dst, out_width, ksize_h, bounds_h, kk_h, block, acc,
                   block_rows);
    } else {
        vertical(src, width, channels, dst, out_height, ksize_v, bounds_v, kk_v, acc);
    }
    status = 0;
done:
    free(bounds_v);
    free(bounds_h);
    free(kk_v);
    free(kk_h);
    free(acc);
    free(tmp);
    free(block);
    return status;
}

static PyObject *py_resize(PyObject *self, PyObject *args) {
    Py_buffer src;
    int width, height, channels, out_width, out_height, bicubic_filter, vertical_first;
    if (!PyArg_ParseTuple(args, "y*iiiiipp", &src, &width, &height, &channels, &out_width, &out_height,
                          &bicubic_filter, &vertical_first)) {
        return NULL;
    }
    if ((channels != 1 && channels != 3) || width < 1 || height < 1 || out_width < 1 || out_height < 1 ||
        src.len != (Py_ssize_t)width * height * channels || (out_width == width && out_height == height)) {
        PyBuffer_Release(&src);
        PyErr_Format(PyExc_ValueError,
                     "resize: %zd bytes for a %dx%d image of %d channel(s) to %dx%d: expected width*height*"
                     "channels bytes, 1 or 3 channels, positive sizes and a size that changes",
                     src.len, width, height, channels, out_width, out_height);
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)out_width * out_height * channels);
    if (!out) {
        PyBuffer_Release(&src);
        return NULL;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = resize(src.buf, width, height, channels, (uint8_t *)PyBytes_AS_STRING(out), out_width, out_height,
                    bicubic_filter, vertical_first);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    if (status) {
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    return out;
}

/* Paeth's predictor without branches (a branch per byte on noisy pixels mispredicts half the time): the
 * byte above-left `c` and above `b` are known before the left one `a`, so only |a - c| and |a + b - 2c| wait
 * for the previous byte. */
static inline uint8_t paeth(int a, int b, int c) {
    int pa = abs(b - c), pb = abs(a - c), pc = abs(a + b - 2 * c);
    int not_a = (pb < pa) | (pc < pa);   /* a wins when pa <= pb and pa <= pc */
    int bc = pc < pb ? c : b;            /* else b when pb <= pc, else c */
    return (uint8_t)(not_a ? bc : a);
}

/* One row with `bpp` bytes per pixel known at compile time: the left pixel is carried in registers, not read
 * back from the row just written (a store-to-load round trip per byte doubled Paeth's time). */
static inline __attribute__((always_inline)) int unfilter_row(int kind, const uint8_t *in, const uint8_t *up,
                                                              uint8_t *row, size_t stride, const int bpp) {
    int left[3] = {0, 0, 0}, upleft[3] = {0, 0, 0};
    size_t i;
    switch (kind) {
    case 0:
        memcpy(row, in, stride);
        return 0;
    case 1:
        for (i = 0; i < stride; i += bpp) {
            for (int c = 0; c < bpp; c++) {
                row[i + c] = (uint8_t)(left[c] = (in[i + c] + left[c]) & 255);
            }
        }
        return 0;
    case 2:
        for (i = 0; i < stride; i++) {
            row[i] = (uint8_t)(in[i] + up[i]);
        }
        return 0;
    case 3:
        for (i = 0; i < stride; i += bpp) {
            for (int c = 0; c < bpp; c++) {
                row[i + c] = (uint8_t)(left[c] = (in[i + c] + ((left[c] + up[i + c]) >> 1)) & 255);
            }
        }
        return 0;
    case 4:
        for (i = 0; i < stride; i += bpp) {
            for (int c = 0; c < bpp; c++) {
                int above = up[i + c];
                row[i + c] = (uint8_t)(left[c] = (in[i + c] + paeth(left[c], above, upleft[c])) & 255);
                upleft[c] = above;
            }
        }
        return 0;
    }
    return -1;
}

/* PNG row filters undone (PNG spec, section 9): `raw` is the inflated pixel data of a non-interlaced 8-bit
 * image with `bpp` (1 or 3) bytes per pixel, one filter-type byte before each row; the row above the first
 * is zeros. 0 on success, -1 for an unknown filter type. */
static int unfilter(const uint8_t *raw, int width, int height, int bpp, uint8_t *out) {
    size_t stride = (size_t)width * bpp;
    uint8_t *zeros = calloc(stride, 1);
    int status = zeros ? 0 : -2;
    for (int y = 0; y < height && !status; y++) {
        const uint8_t *in = raw + (size_t)y * (stride + 1);
        uint8_t *row = out + (size_t)y * stride;
        const uint8_t *up = y ? row - stride : zeros;
        status = bpp == 3 ? unfilter_row(in[0], in + 1, up, row, stride, 3)
                          : unfilter_row(in[0], in + 1, up, row, stride, 1);
    }
    free(zeros);
    return status;
}

static PyObject *py_unfilter(PyObject *self, PyObject *args) {
    Py_buffer raw;
    int width, height, bpp;
    if (!PyArg_ParseTuple(args, "y*iii", &raw, &width, &height, &bpp)) {
        return NULL;
    }
    if (width < 1 || height < 1 || (bpp != 1 && bpp != 3) ||
        raw.len != (Py_ssize_t)height * (1 + (Py_ssize_t)width * bpp)) {
        PyBuffer_Release(&raw);
        PyErr_Format(PyExc_ValueError,
                     "unfilter: %zd bytes of pixel data for %dx%d pixels of %d byte(s): expected height*(1+width*bpp), "
                     "bpp 1 or 3",
                     raw.len, width, height, bpp);
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)width * height * bpp);
    if (!out) {
        PyBuffer_Release(&raw);
        return NULL;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = unfilter(raw.buf, width, height, bpp, (uint8_t *)PyBytes_AS_STRING(out));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&raw);
    if (status) {
        Py_DECREF(out);
        if (status == -2) {
            return PyErr_NoMemory();
        }
        PyErr_SetString(PyExc_ValueError, "unfilter: a row has a filter type other than 0-4 (not a valid PNG)");
        return NULL;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"unfilter", py_unfilter, METH_VARARGS,
     "unfilter(pixel_data, width, height, bpp) -> bytes: a non-interlaced 8-bit PNG's inflated pixel data with "
     "its row filters undone (packed rows, no filter bytes)."},
    {"resize", py_resize, METH_VARARGS,
     "resize(pixels, width, height, channels, out_width, out_height, bicubic, vertical_first) -> bytes: "
     "Pillow's LANCZOS (bicubic false) or BICUBIC resize of packed 8-bit rows, the same bytes as Image.resize "
     "when its passes run in the same order."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pixels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pixels(void) { return PyModule_Create(&module); }
