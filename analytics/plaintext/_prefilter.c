/* The fingerprint prefilter of one ASCII view in one call (issue 15.3).
 *
 * What analytics/plaintext/fingerprints.py does with bytes.translate and ~30 numpy
 * calls (tokenise_view, Tokens.blocks, ValueHasher.prefilter_keys, Prefilter.passes),
 * done here in one pass each: the run buffer ("+" words "+" phone digits without
 * spaces "+" phone digits with spaces, then 32 separators), its runs (bytes above "+"
 * between separators), each run's 16-byte block (first 16 bytes, zero-padded), one
 * AES-128-ECB call over all blocks (OpenSSL, the same cipher as the `cryptography`
 * path) and a probe of the bit filter per key. The Python path stays the reference:
 * tests/analytics/test_fingerprint_prefilter.py checks both give the same answers.
 * Non-ASCII views return None (the Python path normalises them with NFKC).
 * The GIL is held throughout, so a Scanner's cipher context and scratch are never
 * used by two threads at once. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AESNI 1
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#define BLOCK 16
#define SEP 0x2B         /* "+": a byte <= SEP separates runs */
#define TAIL (2 * BLOCK) /* separators that end the buffer */
#define PAIRS 1024
#define MAX_VIEW ((Py_ssize_t)1 << 26) /* larger views take the Python path */
#define KEEP_SCRATCH ((size_t)4 << 20)  /* scratch kept between calls (a 4 KiB view: ~0.2 MB) */

static unsigned char word_table[256];  /* lower case letters and digits, else a space */
static unsigned char phone_table[256]; /* digits and space kept, punctuation 0 (deleted), else SEP */

#ifdef HAVE_AESNI
/* compaction of 8 bytes by a mask of those kept: their indexes first (pshufb), how many */
static unsigned char compact_index[256][8], compact_count[256];
#endif

static void init_tables(void) {
#ifdef HAVE_AESNI
    for (int mask = 0; mask < 256; mask++) {
        int k = 0;
        for (int j = 0; j < 8; j++)
            if (mask >> j & 1)
                compact_index[mask][k++] = (unsigned char)j;
        compact_count[mask] = (unsigned char)k;
        for (; k < 8; k++)
            compact_index[mask][k] = 0x80;
    }
#endif
    for (int c = 0; c < 256; c++) {
        if (c >= 'A' && c <= 'Z')
            word_table[c] = (unsigned char)(c + 32);
        else if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z'))
            word_table[c] = (unsigned char)c;
        else
            word_table[c] = ' ';
        if ((c >= '0' && c <= '9') || c == ' ')
            phone_table[c] = (unsigned char)c;
        else if (strchr("()-.+/", c) != NULL && c != 0)
            phone_table[c] = 0;
        else
            phone_table[c] = SEP;
    }
}

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *ctx;
    unsigned char *scratch; /* run buffer, phones, blocks, ciphertext */
    size_t scratch_size;
    Py_ssize_t *runs; /* start, length of each run */
    size_t runs_size;
    int aesni;                       /* the CPU has AES-NI: encrypt with it, not OpenSSL */
    int ssse3;                       /* translate 16 bytes at a time (pshufb compaction) */
    unsigned char round_keys[11 * 16]; /* AES-128's key schedule, for AES-NI */
} Scanner;

#ifdef HAVE_AESNI
/* AES-128 with AES-NI, eight blocks in flight (the instructions pipeline): the same
 * cipher as OpenSSL's, which is slower here through its ECB provider per call. */
#define EXPAND(k, rcon) expand_step(k, _mm_aeskeygenassist_si128(k, rcon))
__attribute__((target("aes,sse2"))) static inline __m128i expand_step(__m128i k, __m128i t) {
    t = _mm_shuffle_epi32(t, 0xff);
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    return _mm_xor_si128(k, t);
}

__attribute__((target("aes,sse2"))) static void aesni_schedule(const unsigned char *key,
                                                               unsigned char *out) {
    __m128i k[11];
    k[0] = _mm_loadu_si128((const __m128i *)key);
    k[1] = EXPAND(k[0], 0x01);
    k[2] = EXPAND(k[1], 0x02);
    k[3] = EXPAND(k[2], 0x04);
    k[4] = EXPAND(k[3], 0x08);
    k[5] = EXPAND(k[4], 0x10);
    k[6] = EXPAND(k[5], 0x20);
    k[7] = EXPAND(k[6], 0x40);
    k[8] = EXPAND(k[7], 0x80);
    k[9] = EXPAND(k[8], 0x1b);
    k[10] = EXPAND(k[9], 0x36);
    for (int r = 0; r < 11; r++)
        _mm_storeu_si128((__m128i *)(out + 16 * r), k[r]);
}

/* keys[i]: the first 8 bytes of block i's encryption, little endian (x86 is) */
__attribute__((target("aes,sse2"))) static void aesni_keys(const unsigned char *schedule,
                                                           const unsigned char *in,
                                                           Py_ssize_t n, uint64_t *keys) {
    __m128i k[11];
    for (int r = 0; r < 11; r++)
        k[r] = _mm_loadu_si128((const __m128i *)(schedule + 16 * r));
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i b[8];
        for (int j = 0; j < 8; j++)
            b[j] = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(in + 16 * (i + j))), k[0]);
        for (int r = 1; r < 10; r++)
            for (int j = 0; j < 8; j++)
                b[j] = _mm_aesenc_si128(b[j], k[r]);
        for (int j = 0; j < 8; j++)
            _mm_storel_epi64((__m128i *)(keys + i + j), _mm_aesenclast_si128(b[j], k[10]));
    }
    for (; i < n; i++) {
        __m128i b = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(in + 16 * i)), k[0]);
        for (int r = 1; r < 10; r++)
            b = _mm_aesenc_si128(b, k[r]);
        _mm_storel_epi64((__m128i *)(keys + i), _mm_aesenclast_si128(b, k[10]));
    }
}

/* 8 bytes of `v` (the low half) kept by `mask`, stored at dst; returns how many */
__attribute__((target("ssse3"))) static inline int compact8(__m128i v, unsigned mask,
                                                            unsigned char *dst) {
    __m128i index = _mm_loadl_epi64((const __m128i *)compact_index[mask]);
    _mm_storel_epi64((__m128i *)dst, _mm_shuffle_epi8(v, index));
    return compact_count[mask];
}

#define EQ(v, c) _mm_cmpeq_epi8(v, _mm_set1_epi8(c))

/* The three translations of tokenise_view 16 bytes at a time (data[0:n - n % 16]):
 * words (lower case letters and digits, else a space), the phone text (digits and
 * spaces, "()-.+/" deleted, else a separator) and the same without its spaces.
 * Compacted stores write up to 16 bytes past their end: the caller's buffers have
 * room. Returns the bytes done; ORs 0x80 into *high if one of them is not ASCII. */
__attribute__((target("ssse3"))) static Py_ssize_t translate16(
        const unsigned char *data, Py_ssize_t n, unsigned char *words, unsigned char *phones,
        Py_ssize_t *m, unsigned char *nospace, Py_ssize_t *nsp, unsigned char *high) {
    const __m128i A = _mm_set1_epi8('A' - 1), Z = _mm_set1_epi8('Z' + 1);
    const __m128i a = _mm_set1_epi8('a' - 1), z = _mm_set1_epi8('z' + 1);
    const __m128i d0 = _mm_set1_epi8('0' - 1), d9 = _mm_set1_epi8('9' + 1);
    const __m128i space = _mm_set1_epi8(' '), sep = _mm_set1_epi8(SEP);
    const __m128i case_bit = _mm_set1_epi8(0x20);
    __m128i any = _mm_setzero_si128();
    Py_ssize_t i = 0, pm = *m, ns = *nsp;
    for (; i + 16 <= n; i += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(data + i));
        any = _mm_or_si128(any, v);
        /* signed compares: a non-ASCII byte is negative, none of these; such a view is
         * refused by the caller once *high says so */
        __m128i up = _mm_and_si128(_mm_cmpgt_epi8(v, A), _mm_cmplt_epi8(v, Z));
        __m128i lo = _mm_and_si128(_mm_cmpgt_epi8(v, a), _mm_cmplt_epi8(v, z));
        __m128i dg = _mm_and_si128(_mm_cmpgt_epi8(v, d0), _mm_cmplt_epi8(v, d9));
        __m128i keep = _mm_or_si128(_mm_or_si128(up, lo), dg);
        __m128i w = _mm_or_si128(v, _mm_and_si128(up, case_bit));
        _mm_storeu_si128((__m128i *)(words + i),
                         _mm_or_si128(_mm_and_si128(keep, w), _mm_andnot_si128(keep, space)));
        __m128i sp = _mm_cmpeq_epi8(v, space);
        __m128i del = _mm_or_si128(_mm_or_si128(EQ(v, '('), EQ(v, ')')),
                                   _mm_or_si128(_mm_or_si128(EQ(v, '-'), EQ(v, '.')),
                                                _mm_or_si128(EQ(v, '+'), EQ(v, '/'))));
        __m128i kept = _mm_or_si128(dg, sp);
        __m128i p = _mm_or_si128(_mm_and_si128(kept, v), _mm_andnot_si128(kept, sep));
        unsigned pmask = ~(unsigned)_mm_movemask_epi8(del) & 0xffff;
        unsigned nmask = ~(unsigned)_mm_movemask_epi8(_mm_or_si128(del, sp)) & 0xffff;
        if (pmask == 0xffff) {
            _mm_storeu_si128((__m128i *)(phones + pm), p);
            pm += 16;
        } else {
            pm += compact8(p, pmask & 0xff, phones + pm);
            pm += compact8(_mm_srli_si128(p, 8), pmask >> 8, phones + pm);
        }
        if (nmask == 0xffff) {
            _mm_storeu_si128((__m128i *)(nospace + ns), p);
            ns += 16;
        } else {
            ns += compact8(p, nmask & 0xff, nospace + ns);
            ns += compact8(_mm_srli_si128(p, 8), nmask >> 8, nospace + ns);
        }
    }
    *high |= (unsigned char)(_mm_movemask_epi8(any) ? 0x80 : 0);
    *m = pm;
    *nsp = ns;
    return i;
}
#endif

static int grow(Scanner *self, size_t bytes, size_t runs) {
    if (bytes > self->scratch_size) {
        unsigned char *p = PyMem_Realloc(self->scratch, bytes);
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->scratch = p;
        self->scratch_size = bytes;
    }
    if (runs > self->runs_size) {
        Py_ssize_t *r = PyMem_Realloc(self->runs, runs * 2 * sizeof(Py_ssize_t));
        if (r == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->runs = r;
        self->runs_size = runs;
    }
    return 0;
}

/* A large view's scratch is not kept for the agent's lifetime. */
static void shrink(Scanner *self) {
    if (self->scratch_size > KEEP_SCRATCH) {
        PyMem_Free(self->scratch);
        self->scratch = NULL;
        self->scratch_size = 0;
    }
    if (self->runs_size * 2 * sizeof(Py_ssize_t) > KEEP_SCRATCH) {
        PyMem_Free(self->runs);
        self->runs = NULL;
        self->runs_size = 0;
    }
}

static int Scanner_init(Scanner *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"key", NULL};
    Py_buffer key;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*", kwlist, &key))
        return -1;
    if (key.len != 16) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "the prefilter key is 16 bytes (AES-128)");
        return -1;
    }
    if (self->ctx == NULL)
        self->ctx = EVP_CIPHER_CTX_new();
    int ok = self->ctx != NULL &&
             EVP_EncryptInit_ex(self->ctx, EVP_aes_128_ecb(), NULL, key.buf, NULL) == 1 &&
             EVP_CIPHER_CTX_set_padding(self->ctx, 0) == 1;
    self->aesni = 0;
#ifdef HAVE_AESNI
    if (ok && !getenv("LEAKTAP_NO_AESNI") && __builtin_cpu_supports("aes")) {
        aesni_schedule(key.buf, self->round_keys);
        self->aesni = 1;
    }
    self->ssse3 = !getenv("LEAKTAP_NO_SIMD") && __builtin_cpu_supports("ssse3");
#endif
    PyBuffer_Release(&key);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up AES-128-ECB");
        return -1;
    }
    return 0;
}

static void Scanner_dealloc(Scanner *self) {
    if (self->ctx != NULL)
        EVP_CIPHER_CTX_free(self->ctx);
    PyMem_Free(self->scratch);
    PyMem_Free(self->runs);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Where the blocks start in the scratch, after the run buffer and the phones: aligned,
 * since the keys are written over them as uint64_t. */
static size_t blocks_at(size_t used) { return (used + 15) & ~(size_t)15; }

/* The run buffer of an ASCII view at self->scratch; its length, the words' end and the
 * runs (start = the separator in front, length) in self->runs. -1: error set; -2: not
 * ASCII or too large (the caller returns None). */
static Py_ssize_t build_runs(Scanner *self, const unsigned char *data, Py_ssize_t n,
                             Py_ssize_t *words_end, Py_ssize_t *nruns) {
    if (n > MAX_VIEW)
        return -2;
    size_t total = 3 + 3 * (size_t)n + TAIL;
    /* runs: at most one per two bytes (their edges, one per byte, are written first);
     * blocks and ciphertext: 32 bytes a run */
    size_t max_runs = total / 2 + 1;
    if (grow(self, blocks_at(total + (size_t)n) + max_runs * 2 * BLOCK, max_runs) < 0)
        return -1;
    /* the run buffer: SEP, words (n bytes), SEP, the phone text without spaces (nsp
     * bytes), SEP, the phone text (m bytes, built in `phones` first), TAIL */
    unsigned char *buf = self->scratch, *phones = self->scratch + total;
    unsigned char *nospace = buf + n + 2;
    unsigned char high = 0;
    Py_ssize_t done = 0, m = 0, nsp = 0;
#ifdef HAVE_AESNI
    if (self->ssse3)
        done = translate16(data, n, buf + 1, phones, &m, nospace, &nsp, &high);
#endif
    /* branch-free: which way a byte goes is data, and would mispredict */
    for (Py_ssize_t i = done; i < n; i++) {
        unsigned char c = data[i], p = phone_table[c];
        high |= c;
        buf[1 + i] = word_table[c];
        phones[m] = p;
        m += p != 0;
        nospace[nsp] = p;
        nsp += (p != 0) & (p != ' ');
    }
    if (high & 0x80)
        return -2;
    buf[0] = buf[n + 1] = SEP;
    *words_end = n + 1;
    Py_ssize_t at = n + 2 + nsp;
    buf[at++] = SEP;
    memcpy(buf + at, phones, (size_t)m);
    at += m;
    memset(buf + at, SEP, TAIL);
    at += TAIL;

    /* edges as the numpy path finds them: i where buf[i] and buf[i + 1] differ in being
     * a separator; a run is (its first edge, its second edge - its first) */
    Py_ssize_t *runs = self->runs, k = 0;
#ifdef __SSE2__
    /* 16 bytes at a time: a mask of the bytes that are not separators (a signed compare:
     * every byte of the buffer is below 0x80), its changes, one step per edge. The loads
     * past the buffer's end stay in the scratch (the phones follow) and are masked off. */
    const __m128i limit = _mm_set1_epi8(SEP);
    unsigned before = 0; /* the byte before this chunk is not a separator */
    for (Py_ssize_t base = 0; base < at; base += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(buf + base));
        unsigned runs_mask = (unsigned)_mm_movemask_epi8(_mm_cmpgt_epi8(v, limit));
        if (at - base < 16)
            runs_mask &= (1u << (at - base)) - 1;
        unsigned changes = (runs_mask ^ ((runs_mask << 1) | before)) & 0xffff;
        before = runs_mask >> 15;
        while (changes) {
            runs[k++] = base + __builtin_ctz(changes) - 1;
            changes &= changes - 1;
        }
    }
#else
    int prev = 1;
    for (Py_ssize_t i = 1; i < at; i++) {
        int sep = buf[i] <= SEP;
        runs[k] = i - 1;
        k += sep != prev;
        prev = sep;
    }
#endif
    k /= 2; /* the buffer starts and ends with a separator: edges come in pairs */
    for (Py_ssize_t r = 0; r < k; r++)
        runs[2 * r + 1] -= runs[2 * r];
    *nruns = k;
    return at;
}

/* Each run's prefilter block: its first 16 bytes, zero-padded. */
static void run_blocks(const Scanner *self, const unsigned char *buf, Py_ssize_t nruns,
                       unsigned char *blocks) {
    /* 16 bytes read at each run (the buffer ends with TAIL separators, so the reads
     * stay in it) and masked to the run's length, as Tokens.blocks does */
    const Py_ssize_t *runs = self->runs;
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    for (Py_ssize_t k = 0; k < nruns; k++) {
        Py_ssize_t len = runs[2 * k + 1] < BLOCK ? runs[2 * k + 1] : BLOCK;
        memset(blocks + k * BLOCK, 0, BLOCK);
        memcpy(blocks + k * BLOCK, buf + runs[2 * k] + 1, (size_t)len);
    }
#else
    for (Py_ssize_t k = 0; k < nruns; k++) {
        Py_ssize_t len = runs[2 * k + 1] < BLOCK ? runs[2 * k + 1] : BLOCK;
        uint64_t lo, hi;
        memcpy(&lo, buf + runs[2 * k] + 1, 8);
        memcpy(&hi, buf + runs[2 * k] + 9, 8);
        lo &= len >= 8 ? ~(uint64_t)0 : ((uint64_t)1 << (8 * len)) - 1;
        hi &= len >= 16 ? ~(uint64_t)0 : len <= 8 ? 0 : ((uint64_t)1 << (8 * (len - 8))) - 1;
        memcpy(blocks + k * BLOCK, &lo, 8);
        memcpy(blocks + k * BLOCK + 8, &hi, 8);
    }
#endif
}

/* Each block's prefilter key (the first 8 bytes of its encryption, little endian). */
static int encrypt_keys(Scanner *self, const unsigned char *blocks, Py_ssize_t nblocks,
                        unsigned char *out, uint64_t *keys) {
    if (nblocks == 0)
        return 0;
    if (self->ctx == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner.__init__ was not called");
        return -1;
    }
#ifdef HAVE_AESNI
    if (self->aesni) {
        aesni_keys(self->round_keys, blocks, nblocks, keys);
        return 0;
    }
#endif
    int outl = 0;
    if (nblocks > INT_MAX / BLOCK ||
        EVP_EncryptUpdate(self->ctx, out, &outl, blocks, (int)(nblocks * BLOCK)) != 1 ||
        outl != nblocks * BLOCK) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-128-ECB failed");
        return -1;
    }
    for (Py_ssize_t k = 0; k < nblocks; k++) {
        const unsigned char *c = out + k * BLOCK;
        uint64_t v = 0;
        for (int b = 7; b >= 0; b--)
            v = (v << 8) | c[b];
        keys[k] = v;
    }
    return 0;
}

typedef struct {
    Py_buffer words, pairs;
    unsigned shift;
} Filter;

static int filter_get(PyObject *words, PyObject *pairs, unsigned long shift, Filter *f) {
    if (PyObject_GetBuffer(words, &f->words, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (PyObject_GetBuffer(pairs, &f->pairs, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&f->words);
        return -1;
    }
    f->shift = (unsigned)shift;
    if (shift < 34 || shift > 63 || f->words.len != (Py_ssize_t)(4ull << (64 - shift)) ||
        f->pairs.len != PAIRS * 4) {
        PyBuffer_Release(&f->words);
        PyBuffer_Release(&f->pairs);
        PyErr_SetString(PyExc_ValueError,
                        "the prefilter words must be 2**(64 - shift) uint32, the pairs 1024");
        return -1;
    }
    return 0;
}

static void filter_release(Filter *f) {
    PyBuffer_Release(&f->words);
    PyBuffer_Release(&f->pairs);
}

/* Marks passed[k] for every key the filter lets through; returns how many. */
static Py_ssize_t probe(const Filter *f, const uint64_t *keys, Py_ssize_t n, char *passed) {
    const uint32_t *words = f->words.buf, *pairs = f->pairs.buf;
    for (Py_ssize_t k = 0; k < n; k++) /* the reads miss the caches: start them all */
        __builtin_prefetch(words + (keys[k] >> f->shift));
    Py_ssize_t count = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        uint32_t pair = pairs[keys[k] & (PAIRS - 1)];
        passed[k] = (words[keys[k] >> f->shift] & pair) == pair;
        count += passed[k];
    }
    return count;
}

static PyObject *int_list(const Py_ssize_t *values, Py_ssize_t n, Py_ssize_t stride) {
    PyObject *list = PyList_New(n);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromSsize_t(values[i * stride]);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

/* The runs of `data` and their prefilter keys, in the scratch: returns the run
 * buffer's length (-2: not ASCII, -1: an error is set), where its words end, how many
 * runs it has, the keys and the ciphertext they were taken from (free for reuse). */
static Py_ssize_t runs_and_keys(Scanner *self, const Py_buffer *data, Py_ssize_t *words_end,
                                Py_ssize_t *nruns, uint64_t **keys, unsigned char **cipher) {
    Py_ssize_t len = build_runs(self, data->buf, data->len, words_end, nruns);
    if (len < 0)
        return len;
    unsigned char *blocks = self->scratch + blocks_at(3 + 3 * (size_t)data->len + TAIL +
                                                      (size_t)data->len);
    *cipher = blocks + *nruns * BLOCK;
    /* keys overwrite the blocks (key i over block i / 2, read by then: also with AES-NI,
     * which reads eight blocks before it writes their keys) */
    *keys = (uint64_t *)blocks;
    run_blocks(self, self->scratch, *nruns, blocks);
    if (encrypt_keys(self, blocks, *nruns, *cipher, *keys) < 0)
        return -1;
    return len;
}

/* scan(data, words, pairs, shift) -> None (not ASCII) or (buf, words_end, runs,
 * passed, starts, lengths): the run buffer, where its words end, how many runs it
 * has, and the indexes, starts and lengths of the runs that passed the filter. */
static PyObject *Scanner_scan(Scanner *self, PyObject *args) {
    Py_buffer data;
    PyObject *words, *pairs;
    unsigned long shift;
    if (!PyArg_ParseTuple(args, "y*OOk", &data, &words, &pairs, &shift))
        return NULL;
    Filter f;
    if (filter_get(words, pairs, shift, &f) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t words_end, nruns;
    uint64_t *keys;
    unsigned char *cipher;
    Py_ssize_t len = runs_and_keys(self, &data, &words_end, &nruns, &keys, &cipher);
    if (len == -2) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (len < 0)
        goto done;
    char *passed = (char *)cipher; /* the ciphertext is read: passed flags go there */
    Py_ssize_t count = probe(&f, keys, nruns, passed);
    /* the passed runs (index, start, length) copied out of the scratch before any
     * Python object is made (a collection's finalizers may let another thread in) */
    Py_ssize_t *picked = PyMem_Malloc((size_t)(count ? count : 1) * 3 * sizeof(Py_ssize_t));
    if (picked == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t j = 0;
    for (Py_ssize_t k = 0; k < nruns; k++)
        if (passed[k]) {
            picked[3 * j] = k;
            picked[3 * j + 1] = self->runs[2 * k];
            picked[3 * j + 2] = self->runs[2 * k + 1];
            j++;
        }
    PyObject *buf = PyBytes_FromStringAndSize((const char *)self->scratch, len);
    PyObject *idx = int_list(picked, count, 3), *starts = int_list(picked + 1, count, 3);
    PyObject *lens = int_list(picked + 2, count, 3);
    PyMem_Free(picked);
    if (buf && idx && starts && lens)
        result = Py_BuildValue("(NnnNNN)", buf, words_end, nruns, idx, starts, lens);
    else {
        Py_XDECREF(buf);
        Py_XDECREF(idx);
        Py_XDECREF(starts);
        Py_XDECREF(lens);
    }
done:
    shrink(self);
    filter_release(&f);
    PyBuffer_Release(&data);
    return result;
}

/* tokens(data) -> None (not ASCII) or (buf, words_end, starts, lengths, keys): every
 * run and its prefilter key (8 bytes each, little endian), for the equivalence test. */
static PyObject *Scanner_tokens(Scanner *self, PyObject *args) {
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t words_end, nruns;
    uint64_t *keys;
    unsigned char *cipher;
    Py_ssize_t len = runs_and_keys(self, &data, &words_end, &nruns, &keys, &cipher);
    if (len == -2) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (len < 0)
        goto done;
    unsigned char *le = cipher; /* the keys as little-endian bytes */
    for (Py_ssize_t k = 0; k < nruns; k++)
        for (int b = 0; b < 8; b++)
            le[8 * k + b] = (unsigned char)(keys[k] >> (8 * b));
    /* bytes first (no collection can run while they are made), then the runs copied out
     * of the scratch: making lists may run a collection, whose finalizers may let
     * another thread use this scanner */
    PyObject *buf = PyBytes_FromStringAndSize((const char *)self->scratch, len);
    PyObject *kb = PyBytes_FromStringAndSize((const char *)le, nruns * 8);
    PyObject *starts = NULL, *lens = NULL;
    Py_ssize_t *runs = PyMem_Malloc((size_t)(nruns ? nruns : 1) * 2 * sizeof(Py_ssize_t));
    if (runs != NULL) {
        memcpy(runs, self->runs, (size_t)nruns * 2 * sizeof(Py_ssize_t));
        starts = int_list(runs, nruns, 2);
        lens = int_list(runs + 1, nruns, 2);
        PyMem_Free(runs);
    } else
        PyErr_NoMemory();
    if (buf && starts && lens && kb)
        result = Py_BuildValue("(NnNNN)", buf, words_end, starts, lens, kb);
    else {
        Py_XDECREF(buf);
        Py_XDECREF(starts);
        Py_XDECREF(lens);
        Py_XDECREF(kb);
    }
done:
    shrink(self);
    PyBuffer_Release(&data);
    return result;
}

/* probe(blocks, words, pairs, shift) -> [indexes]: the 16-byte blocks (n-grams'
 * blocks, built by the caller) whose keys pass the filter. */
static PyObject *Scanner_probe(Scanner *self, PyObject *args) {
    Py_buffer blocks;
    PyObject *words, *pairs;
    unsigned long shift;
    if (!PyArg_ParseTuple(args, "y*OOk", &blocks, &words, &pairs, &shift))
        return NULL;
    Filter f;
    if (filter_get(words, pairs, shift, &f) < 0) {
        PyBuffer_Release(&blocks);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = blocks.len / BLOCK;
    if (blocks.len % BLOCK != 0) {
        PyErr_SetString(PyExc_ValueError, "blocks are 16 bytes each");
        goto done;
    }
    if (grow(self, (size_t)n * (BLOCK + 8 + 1) + 1, 0) < 0)
        goto done;
    unsigned char *cipher = self->scratch;
    uint64_t *keys = (uint64_t *)(self->scratch + n * BLOCK);
    char *passed = (char *)(keys + n);
    if (encrypt_keys(self, blocks.buf, n, cipher, keys) < 0)
        goto done;
    Py_ssize_t count = probe(&f, keys, n, passed);
    /* the indexes copied out of the scratch first: making Python objects may run a
     * collection, whose finalizers may let another thread use this scanner */
    Py_ssize_t *picked = PyMem_Malloc((size_t)(count ? count : 1) * sizeof(Py_ssize_t));
    if (picked == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0, j = 0; k < n; k++)
        if (passed[k])
            picked[j++] = k;
    result = int_list(picked, count, 1);
    PyMem_Free(picked);
done:
    shrink(self);
    filter_release(&f);
    PyBuffer_Release(&blocks);
    return result;
}

static PyMethodDef Scanner_methods[] = {
    {"scan", (PyCFunction)Scanner_scan, METH_VARARGS,
     "scan(data, words, pairs, shift): the runs of an ASCII view that pass the filter"},
    {"tokens", (PyCFunction)Scanner_tokens, METH_VARARGS,
     "tokens(data): every run of an ASCII view and its prefilter key"},
    {"probe", (PyCFunction)Scanner_probe, METH_VARARGS,
     "probe(blocks, words, pairs, shift): indexes of the blocks that pass the filter"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Scanner_members[] = {
    {"aesni", T_INT, offsetof(Scanner, aesni), READONLY,
     "1: AES-NI encrypts (0: OpenSSL; LEAKTAP_NO_AESNI=1 at creation asks for it)"},
    {"simd", T_INT, offsetof(Scanner, ssse3), READONLY,
     "1: views are translated 16 bytes at a time (0: a byte at a time; LEAKTAP_NO_SIMD=1)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "leaktap.analytics.plaintext._prefilter.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Scanner(key): the fingerprint prefilter of views under one AES-128 key",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Scanner_init,
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_methods = Scanner_methods,
    .tp_members = Scanner_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_prefilter",
    "The fingerprint prefilter of one view in one call (see fingerprints.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__prefilter(void) {
    init_tables();
    if (PyType_Ready(&ScannerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Scanner", (PyObject *)&ScannerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
