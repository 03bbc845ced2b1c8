/* One decoder block's step for one new token per row, in one call (glassformer.cells.block_step).

   Decoding one token runs about sixty small PyTorch operations per block around its five weight
   products; on a small model that costs as much as the products. When nothing watches the block
   (no hook active, no autograd), the same arithmetic runs here, with the products of quant_gemv.c:

     h = norm1(x);  q, k, v = h @ W_qkv.T (+ b);  q, k rotated (rotate-half or interleaved pairs, the
     first rotary_dim dims; none when rotary_dim is 0);  k, v written at `slot`;  z = softmax(q . k *
     scale over the visible slots) . v per head (grouped-query: a key/value head serves n_heads /
     n_kv_heads heads);  r = x + z @ W_O.T (+ b);  h = norm2(r);
     out = r + act(h @ W_gate.T) * (h @ W_in.T + b) @ W_out.T (+ b)  (gated), or
     out = r + act(h @ W_in.T + b) @ W_out.T (+ b)
   where a norm is RMSNorm (x / sqrt(mean(x^2) + eps) * w) or LayerNorm ((x - mean) / sqrt(var + eps)
   * w + b), and act is SiLU, GELU (erf or tanh) or ReLU.

   A slot is visible when key_valid says so, it is not after `slot`, and (with a window) it is one of
   the last `window` slots; a row with no visible slot attends to every slot, as AttentionMask does. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

void gf_quant_matmul(int bits, const float *x, int M, int K, const void *q, const float *scale,
                     const float *min, int N, int group, const float *bias, float *y, int threads);

typedef struct {
    int bits;  /* 32 (float32), 16 (bf16), 8 or 4 */
    int group; /* columns per scale and min (float32: k) */
    int n, k;  /* outputs, and inputs as stored (the input width rounded up to the group) */
    const void *q;
    const float *scale, *min, *bias; /* scale and min NULL for float32; bias may be NULL */
} gf_weight;

enum { SILU, GELU, GELU_TANH, RELU };

typedef struct {
    int batch, d_model, n_heads, n_kv_heads, d_head, d_mlp, rotary_dim, interleaved, window;
    int slot, n_keys, max_len, threads;
    int layer_norm, act, gated;            /* LayerNorm (else RMSNorm); SILU..RELU; a gate product */
    float eps, scale;
    const float *ln1, *ln2, *ln1_b, *ln2_b; /* (d_model,) norm weights; LayerNorm biases or NULL */
    gf_weight qkv, o, gate, up, down;      /* gate unused unless gated */
    const float *cos, *sin;                /* (batch, rotary_dim): cos and signed sin at each row's position */
    float *k_cache, *v_cache;              /* (batch, n_kv_heads, max_len, d_head) */
    const uint8_t *key_valid;              /* (batch, max_len) */
} gf_step;

/* y (M, w->n) = x (M, width) @ W.T + b; `pad` holds x widened to the stored columns when they differ. */
static void product(const gf_weight *w, const float *x, int M, int width, float *pad, float *y, int threads) {
    if (w->k != width) {
        for (int m = 0; m < M; m++) {
            memcpy(pad + (int64_t)m * w->k, x + (int64_t)m * width, sizeof(float) * width);
            memset(pad + (int64_t)m * w->k + width, 0, sizeof(float) * (w->k - width));
        }
        x = pad;
    }
    gf_quant_matmul(w->bits, x, M, w->k, w->q, w->scale, w->min, w->n, w->group, w->bias, y, threads);
}

/* a . b over n floats, in independent partial sums (one chain of n dependent adds is latency-bound) */
static float dot(const float *a, const float *b, int n) {
    int i = 0;
    float total = 0.f;
#ifdef __AVX512F__
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
    float part[4] = {0.f, 0.f, 0.f, 0.f};
    for (; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++) part[j] += a[i + j] * b[i + j];
    for (; i < n; i++) part[0] += a[i] * b[i];
    return total + (part[0] + part[1]) + (part[2] + part[3]);
}

/* out (M, D) = the norm of x, row by row: RMSNorm, or LayerNorm (centred first; bias b may be NULL) */
static void norm(const float *x, int M, int D, int layer_norm, const float *w, const float *b, float eps,
                 float *out) {
    for (int m = 0; m < M; m++) {
        const float *xr = x + (int64_t)m * D;
        float *o = out + (int64_t)m * D, mean = 0.f;
        if (layer_norm) {
            for (int i = 0; i < D; i++) mean += xr[i];
            mean /= D;
        }
        for (int i = 0; i < D; i++) o[i] = xr[i] - mean;
        float inv = 1.f / sqrtf(dot(o, o, D) / D + eps);
        for (int i = 0; i < D; i++) o[i] = o[i] * inv * w[i] + (b ? b[i] : 0.f);
    }
}

static float activation(int act, float v) {
    switch (act) {
    case SILU: return v / (1.f + expf(-v));
    case GELU: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case GELU_TANH: return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default: return v > 0.f ? v : 0.f;
    }
}

/* v (d_head) rotated in place: v*cos + swap(v)*signed_sin over the first rotary_dim dims */
static void rotate(float *v, const float *cos, const float *sin, int rd, int interleaved) {
    float turned[rd];
    int half = rd / 2;
    for (int i = 0; i < rd; i++) {
        int j = interleaved ? i ^ 1 : i < half ? i + half : i - half;
        turned[i] = v[i] * cos[i] + v[j] * sin[i];
    }
    memcpy(v, turned, sizeof(float) * rd);
}

/* z (d_head) for one query head against its key/value head's visible slots; `p` holds n_keys floats */
static void attend(const gf_step *s, const float *q, const float *keys, const float *values,
                   const uint8_t *valid, float *p, float *z) {
    int dh = s->d_head, n = s->n_keys, any = 0;
    for (int j = 0; j < n; j++)
        any |= valid[j] && j <= s->slot && (s->window <= 0 || s->slot - j < s->window);
    float top = -INFINITY;
    for (int j = 0; j < n; j++) {
        int seen = !any || (valid[j] && j <= s->slot && (s->window <= 0 || s->slot - j < s->window));
        if (!seen) {
            p[j] = -INFINITY;
            continue;
        }
        p[j] = dot(q, keys + (int64_t)j * dh, dh) * s->scale;
        top = p[j] > top ? p[j] : top;
    }
    float total = 0.f;
    for (int j = 0; j < n; j++) {
        p[j] = p[j] == -INFINITY ? 0.f : expf(p[j] - top);
        total += p[j];
    }
    for (int i = 0; i < dh; i++) z[i] = 0.f;
    for (int j = 0; j < n; j++) {
        if (p[j] == 0.f) continue;
        float w = p[j] / total;
        const float *vj = values + (int64_t)j * dh;
        for (int i = 0; i < dh; i++) z[i] += w * vj[i];
    }
}

static int widest(int a, int b) { return a > b ? a : b; }

/* out (batch, d_model) = the block applied to x (batch, d_model); the new keys and values are cached.
   Returns 0, or 1 when memory for the scratch could not be had (nothing is written then). */
int gf_decode_block(const gf_step *s, const float *x, float *out) {
    int B = s->batch, D = s->d_model, H = s->n_heads, HKV = s->n_kv_heads, dh = s->d_head, F = s->d_mlp;
    int Q = H * dh, KV = HKV * dh, QKV = Q + 2 * KV, group = H / HKV;
    int padded = widest(widest(s->qkv.k, s->gate.k), widest(widest(s->up.k, s->o.k), s->down.k));
    int64_t sizes[] = {(int64_t)B * D, (int64_t)B * widest(padded, widest(Q, F)), (int64_t)B * QKV,
                       (int64_t)B * Q, (int64_t)B * D, (int64_t)B * F, (int64_t)B * F, (int64_t)B * H * s->n_keys};
    int64_t total = 0;
    for (int i = 0; i < 8; i++) total += sizes[i];
    float *scratch = malloc(sizeof(float) * total);
    if (!scratch) return 1;
    float *h = scratch, *pad = h + sizes[0], *qkv = pad + sizes[1], *z = qkv + sizes[2], *r = z + sizes[3];
    float *gate = r + sizes[4], *up = gate + sizes[5], *probs = up + sizes[6];

    norm(x, B, D, s->layer_norm, s->ln1, s->ln1_b, s->eps, h);
    product(&s->qkv, h, B, D, pad, qkv, s->threads); /* (B, QKV): q heads, k heads, v heads */
    for (int b = 0; b < B; b++) {
        float *row = qkv + (int64_t)b * QKV;
        for (int head = 0; head < (s->rotary_dim ? H + HKV : 0); head++) /* the query heads, then the key heads */
            rotate(row + (int64_t)head * dh, s->cos + (int64_t)b * s->rotary_dim, s->sin + (int64_t)b * s->rotary_dim,
                   s->rotary_dim, s->interleaved);
        for (int kh = 0; kh < HKV; kh++) {
            int64_t at = (((int64_t)b * HKV + kh) * s->max_len + s->slot) * dh;
            memcpy(s->k_cache + at, row + Q + (int64_t)kh * dh, sizeof(float) * dh);
            memcpy(s->v_cache + at, row + Q + KV + (int64_t)kh * dh, sizeof(float) * dh);
        }
    }
#pragma omp parallel for schedule(static) num_threads(s->threads) if ((int64_t)B * H * s->n_keys * dh > 65536)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, head = bh % H;
        int64_t kv = ((int64_t)b * HKV + head / group) * s->max_len * dh;
        attend(s, qkv + (int64_t)b * QKV + (int64_t)head * dh, s->k_cache + kv, s->v_cache + kv,
               s->key_valid + (int64_t)b * s->max_len, probs + (int64_t)bh * s->n_keys, z + (int64_t)bh * dh);
    }
    product(&s->o, z, B, Q, pad, r, s->threads);
    for (int64_t i = 0; i < (int64_t)B * D; i++) r[i] += x[i]; /* the residual after attention */
    norm(r, B, D, s->layer_norm, s->ln2, s->ln2_b, s->eps, h);
    product(&s->up, h, B, D, pad, up, s->threads);
    if (s->gated) {
        product(&s->gate, h, B, D, pad, gate, s->threads);
        for (int64_t i = 0; i < (int64_t)B * F; i++) up[i] *= activation(s->act, gate[i]);
    } else
        for (int64_t i = 0; i < (int64_t)B * F; i++) up[i] = activation(s->act, up[i]);
    product(&s->down, up, B, F, pad, out, s->threads);
    for (int64_t i = 0; i < (int64_t)B * D; i++) out[i] += r[i];
    free(scratch);
    return 0;
}
