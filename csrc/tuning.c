/*
 * tuning.c - the choices that depend on the machine, made on the machine that
 * runs, once per process and lazily, each overridable by an environment
 * variable and reported by dnbn_tuning_report (Python: darknet_bn.info()).
 *
 *   group size   Input bytes of a channel group (channels.c): from the L2
 *                cache of one core, read from the system (sysconf, then
 *                sysfs), so that the second pass over a group finds it in
 *                cache; then timed per kind of pass, size class and thread
 *                count against its half, quarter and eighth (which pays
 *                differs by machine), after the stores below.
 *                DARKNET_BN_GROUP_KB fixes it.
 *   threads      The least work (element operations) worth another thread:
 *                measured at the first parallel call as the time a sleeping
 *                worker takes to wake and start (median of a few trials) over
 *                the time per value of an elementwise pass in cache, times
 *                WAKE_FACTOR. DARKNET_BN_MIN_WORK overrides.
 *   streaming    Whether a pass that writes a large tensor uses non-temporal
 *                stores. Whether they pay depends on the CPU, its caches, the
 *                memory and the thread count in ways no cache size predicts
 *                (measured: 2x faster on one machine, 2x slower on another),
 *                so the library times it: the first calls of each kind of
 *                pass, size class (a power of two of the bytes it touches)
 *                and thread count run first with plain stores, then with
 *                streaming ones (the first calls of each untimed), and the
 *                faster is kept for the rest of the process.
 *                DARKNET_BN_STREAM=auto (default) | always | never.
 *   instructions AVX2+FMA or the portable path (dispatch.c, DARKNET_BN_SIMD).
 *
 * Mutable globals: the calibration results and the streaming table, written
 * under `lock` (or once), read by any thread.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

/* A positive integer from the environment, or 0 when unset or not one. */
static long env_long(const char *name, int *ignored)
{
    const char *v = getenv(name);
    if (!v || !*v) return 0;
    char *end;
    long n = strtol(v, &end, 10);
    if (*end != '\0' || n < 1) {
        *ignored = 1;
        return 0;
    }
    return n;
}

/* ---- cache sizes ---- */

/* Size in bytes of the level-`level` data or unified cache of CPU 0 (sysfs),
 * or 0 when the system does not say. */
static long sysfs_cache_bytes(int level)
{
    for (int index = 0; index < 8; index++) {
        char path[96], text[32];
        long got_level = 0;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/level", index);
        FILE *f = fopen(path, "r");
        if (!f) return 0;
        int ok = fscanf(f, "%ld", &got_level) == 1;
        fclose(f);
        if (!ok || got_level != level) continue;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/type", index);
        if (!(f = fopen(path, "r"))) continue;
        ok = fscanf(f, "%31s", text) == 1;
        fclose(f);
        if (!ok || strcmp(text, "Instruction") == 0) continue;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", index);
        if (!(f = fopen(path, "r"))) continue;
        long size = 0;
        char unit = 0;
        ok = fscanf(f, "%ld%c", &size, &unit) >= 1;
        fclose(f);
        if (!ok) continue;
        return unit == 'K' ? size << 10 : unit == 'M' ? size << 20 : size;
    }
    return 0;
}

static long cache_bytes(int level)
{
    long n = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    n = sysconf(level == 2 ? _SC_LEVEL2_CACHE_SIZE : _SC_LEVEL3_CACHE_SIZE);
#endif
    return n > 0 ? n : sysfs_cache_bytes(level);
}

/* ---- group size ---- */

#define GROUP_MIN_BYTES ((idx_t)256 << 10)
#define GROUP_MAX_BYTES ((idx_t)4 << 20)
#define GROUP_DEFAULT_BYTES ((idx_t)1 << 20)

static struct {
    idx_t group_bytes;
    long l2, l3;
    const char *group_source;
    int group_fixed; /* by DARKNET_BN_GROUP_KB: no group-size trials */
} caches;
static pthread_once_t caches_once = PTHREAD_ONCE_INIT;

static void read_caches(void)
{
    int ignored = 0;
    caches.l2 = cache_bytes(2);
    caches.l3 = cache_bytes(3);
    long kb = env_long("DARKNET_BN_GROUP_KB", &ignored);
    if (kb) {
        caches.group_bytes = (idx_t)kb << 10;
        caches.group_source = "DARKNET_BN_GROUP_KB";
        caches.group_fixed = 1;
        return;
    }
    idx_t g = caches.l2 > 0 ? caches.l2 : GROUP_DEFAULT_BYTES;
    caches.group_bytes = g < GROUP_MIN_BYTES ? GROUP_MIN_BYTES : g > GROUP_MAX_BYTES ? GROUP_MAX_BYTES : g;
    caches.group_source = ignored ? "L2 size (DARKNET_BN_GROUP_KB ignored: not a positive integer)"
                          : caches.l2 > 0 ? "L2 size"
                                          : "default (L2 size unknown)";
}

idx_t dnbn_group_bytes(void)
{
    pthread_once(&caches_once, read_caches);
    return caches.group_bytes;
}

/* ---- the thread threshold ---- */

/* Work per thread of at least this many wake-up times. Low, because a late
 * worker costs the caller nothing (it takes no chunk once all are claimed). */
#define WAKE_FACTOR 2
#define MIN_WORK_FLOOR ((idx_t)1 << 12)
#define MIN_WORK_CEIL ((idx_t)1 << 22)
#define MIN_WORK_DEFAULT ((idx_t)1 << 17) /* until calibrated, or when calibration cannot run */
#define WAKE_TRIALS 9

enum { CAL_NONE, CAL_RUNNING, CAL_DONE };
static atomic_int cal_state;
static atomic_llong min_work = MIN_WORK_DEFAULT;
static struct {
    double wake_ns, value_ns;
    int threads;
    const char *source;
} cal = {0, 0, 0, "not calibrated yet (no parallel call)"};

typedef struct wake_probe {
    double posted;
    atomic_int woke; /* a worker's first chunk started */
    double woke_at;
    pthread_t caller;
} wake_probe;

/* The caller's chunk waits (up to 2 ms) for a worker to take the other one. */
static void wake_chunk(void *arg, idx_t lo, idx_t hi)
{
    (void)hi;
    wake_probe *w = arg;
    if (!pthread_equal(pthread_self(), w->caller)) {
        w->woke_at = now_ns();
        atomic_store(&w->woke, 1);
        return;
    }
    (void)lo;
    while (!atomic_load(&w->woke) && now_ns() - w->posted < 2e6) sched_yield();
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void calibrate_threads(int threads)
{
    /* time per value of the training forward's elementwise pass (one read,
     * three writes) on 1 MB, data in L2 as a channel group's second pass */
    enum { N = 65536 };
    float *in = malloc(4 * N * sizeof *in);
    cal.threads = threads;
    if (!in) {
        cal.source = "default (no memory to calibrate)";
        return;
    }
    for (int i = 0; i < N; i++) in[i] = (float)(i % 97) * 0.25f;
    const dnbn_rows *r = dnbn_rows_active();
    double per[WAKE_TRIALS];
    for (int t = 0; t < WAKE_TRIALS; t++) {
        double t0 = now_ns();
        r->forward_train(in, in + N, in + 2 * N, in + 3 * N, N, 1.0f, 0.0f, 0.5f, 2.0f, 0.1f, 0);
        per[t] = (now_ns() - t0) / N;
    }
    free(in);
    qsort(per, WAKE_TRIALS, sizeof *per, cmp_double);
    cal.value_ns = per[WAKE_TRIALS / 2] > 0.01 ? per[WAKE_TRIALS / 2] : 0.01;

    /* wake-up: from posting a two-chunk job to a worker starting its chunk */
    double wake[WAKE_TRIALS];
    int got = 0;
    dnbn_parallel_for(2, 2, wake_chunk, &(wake_probe){now_ns(), 0, 0, pthread_self()}); /* creates the worker */
    for (int t = 0; t < WAKE_TRIALS; t++) {
        wake_probe w = {now_ns(), 0, 0, pthread_self()};
        dnbn_parallel_for(2, 2, wake_chunk, &w);
        if (atomic_load(&w.woke)) wake[got++] = w.woke_at - w.posted;
    }
    if (got < WAKE_TRIALS / 2 + 1) {
        cal.source = "default (workers did not wake within 2 ms)";
        return;
    }
    qsort(wake, got, sizeof *wake, cmp_double);
    cal.wake_ns = wake[got / 2];
    idx_t w = (idx_t)(WAKE_FACTOR * cal.wake_ns / cal.value_ns);
    w = w < MIN_WORK_FLOOR ? MIN_WORK_FLOOR : w > MIN_WORK_CEIL ? MIN_WORK_CEIL : w;
    atomic_store(&min_work, w);
    cal.source = "calibrated";
}

idx_t dnbn_min_work_per_thread(int threads)
{
    int state = atomic_load(&cal_state);
    if (state == CAL_DONE || threads < 2) return (idx_t)atomic_load(&min_work);
    int expected = CAL_NONE;
    if (state != CAL_NONE || !atomic_compare_exchange_strong(&cal_state, &expected, CAL_RUNNING))
        return (idx_t)atomic_load(&min_work); /* another thread is calibrating: the default meanwhile */
    int ignored = 0;
    long env = env_long("DARKNET_BN_MIN_WORK", &ignored);
    if (env) {
        atomic_store(&min_work, env);
        cal.source = "DARKNET_BN_MIN_WORK";
    } else {
        calibrate_threads(threads);
        if (ignored) cal.source = "calibrated (DARKNET_BN_MIN_WORK ignored: not a positive integer)";
    }
    atomic_store(&cal_state, CAL_DONE);
    return (idx_t)atomic_load(&min_work);
}

void dnbn_tuning_set_min_work(idx_t work)
{
    atomic_store(&cal_state, CAL_DONE);
    atomic_store(&min_work, work < 1 ? 1 : work);
    cal.source = "set by the program";
}

/* ---- streaming stores ---- */

/* Below this many bytes touched a pass never streams: its tensors stay in the caches of any machine. */
#define STREAM_MIN_BYTES ((idx_t)8 << 20)
/* Timed calls of each choice before deciding, after STREAM_PLAIN_WARM untimed
 * plain calls and STREAM_STREAM_WARM untimed streaming calls. */
#define STREAM_TRIALS 3
#define STREAM_PLAIN_WARM 2
#define STREAM_STREAM_WARM 1
/* Streaming must be this much faster to be kept: plain stores leave the
 * output in cache for whoever reads it next, which the timing cannot see. */
#define STREAM_MARGIN 0.95
#define STREAM_SLOTS 96
/* Then a pass whose units are channel groups tries group sizes of the
 * cache-derived size >> 0 .. GROUP_CHOICES - 1, GROUP_TRIAL_CALLS calls each
 * (the first untimed); a smaller one is kept only if at least 5 % faster. */
#define STREAM_FIXED (-2)
#define GROUP_CHOICES 4
#define GROUP_TRIAL_CALLS 3
#define GROUP_MARGIN 0.95

typedef struct stream_slot {
    int used, pass, log2_bytes, threads;
    int calls;      /* calls begun while trying stores */
    int decided;    /* -1 while trying; then 0 (plain) or 1 (stream); STREAM_FIXED: by the mode or layout */
    int timed[2];   /* calls timed with each choice */
    double best[2]; /* fastest of them, ns */
    int group_calls;                   /* calls begun while trying group sizes */
    int group;                         /* -1 until decided; then the shift of the group size kept */
    int grouped;                       /* a call whose units are channel groups came: sizes to try */
    int group_timed[GROUP_CHOICES];    /* calls timed with each size */
    double group_best[GROUP_CHOICES];  /* fastest of them, ns */
} stream_slot;

static struct {
    pthread_mutex_t lock;
    int mode; /* DNBN_STREAM_AUTO, _ALWAYS, _NEVER */
    const char *source;
    stream_slot slot[STREAM_SLOTS];
} streaming = {PTHREAD_MUTEX_INITIALIZER, -1, NULL, {{0}}};

static void stream_fork_prepare(void) { pthread_mutex_lock(&streaming.lock); }
static void stream_fork_release(void) { pthread_mutex_unlock(&streaming.lock); }
static void cal_fork_child(void)
{
    pthread_mutex_unlock(&streaming.lock);
    int running = CAL_RUNNING; /* the calibrating thread does not exist in the child */
    atomic_compare_exchange_strong(&cal_state, &running, CAL_NONE);
}
static pthread_once_t tuning_atfork_once = PTHREAD_ONCE_INIT;
static void tuning_atfork(void) { pthread_atfork(stream_fork_prepare, stream_fork_release, cal_fork_child); }

/* Called with the lock held. */
static void stream_mode_init(void)
{
    if (streaming.mode >= 0) return;
    const char *v = getenv("DARKNET_BN_STREAM");
    streaming.mode = DNBN_STREAM_AUTO;
    streaming.source = "timed per pass, size class and thread count";
    if (!v || !*v || strcmp(v, "auto") == 0) return;
    if (strcmp(v, "always") == 0) {
        streaming.mode = DNBN_STREAM_ALWAYS;
        streaming.source = "DARKNET_BN_STREAM=always";
    } else if (strcmp(v, "never") == 0) {
        streaming.mode = DNBN_STREAM_NEVER;
        streaming.source = "DARKNET_BN_STREAM=never";
    } else {
        streaming.source = "timed (DARKNET_BN_STREAM ignored: not auto, always or never)";
    }
}

void dnbn_tuning_set_stream(int mode)
{
    pthread_mutex_lock(&streaming.lock);
    stream_mode_init();
    streaming.mode = mode;
    streaming.source = "set by the program";
    pthread_mutex_unlock(&streaming.lock);
}

static int log2_floor(idx_t v)
{
    int k = 0;
    while (v > 1) v >>= 1, k++;
    return k;
}

int dnbn_trial_begin(dnbn_trial *trial, int pass, idx_t bytes, int threads, int layout_ok, int grouped)
{
    trial->slot = -1;
    trial->stream = 0;
    trial->timing = DNBN_TIMING_NONE;
    trial->group_bytes = dnbn_group_bytes(); /* reads the caches (once) */
    int group_free = grouped && !caches.group_fixed;
    pthread_once(&tuning_atfork_once, tuning_atfork);
    pthread_mutex_lock(&streaming.lock);
    stream_mode_init();
    int mode = streaming.mode, stream_free = layout_ok && mode == DNBN_STREAM_AUTO;
    int fixed_stream = layout_ok && mode == DNBN_STREAM_ALWAYS;
    if (bytes < STREAM_MIN_BYTES || (!stream_free && !group_free)) {
        pthread_mutex_unlock(&streaming.lock);
        return trial->stream = fixed_stream;
    }
    int lb = log2_floor(bytes), free_slot = -1, s = 0;
    for (; s < STREAM_SLOTS; s++) {
        stream_slot *e = &streaming.slot[s];
        if (!e->used) {
            if (free_slot < 0) free_slot = s;
            continue;
        }
        if (e->pass == pass && e->log2_bytes == lb && e->threads == threads) break;
    }
    if (s == STREAM_SLOTS) {
        if (free_slot < 0) { /* table full: the defaults */
            pthread_mutex_unlock(&streaming.lock);
            return trial->stream = fixed_stream;
        }
        s = free_slot;
        streaming.slot[s] = (stream_slot){.used = 1, .pass = pass, .log2_bytes = lb, .threads = threads,
                                          .decided = STREAM_FIXED, .group = caches.group_fixed ? 0 : -1};
    }
    stream_slot *e = &streaming.slot[s];
    e->grouped |= group_free; /* calls of other layers in the same class may not be grouped: they try no size */
    if (e->decided == STREAM_FIXED && stream_free) e->decided = -1; /* auto (again): time the stores */
    if (e->decided == -1 && stream_free) {
        /* A block of plain calls, then one of streaming calls, the first
         * calls of each untimed: a call's time depends on what the calls
         * before it left in the caches (measured: after streaming calls the
         * output is in memory, and plain calls take two calls to find it in
         * cache again, 1.8x slower meanwhile), and the choice kept will run
         * after itself, so each is timed after its own kind. */
        int call = e->calls++, plain_calls = STREAM_PLAIN_WARM + STREAM_TRIALS;
        trial->stream = call >= plain_calls;
        int warm = trial->stream ? call < plain_calls + STREAM_STREAM_WARM : call < STREAM_PLAIN_WARM;
        if (!warm) trial->slot = s, trial->timing = DNBN_TIMING_STREAM;
    } else if (e->decided != -1) {
        /* a class decided on layers whose rows are whole lines streams
         * only those: partly streamed lines are slow on both kinds of store
         * (measured: 16x512x13x13's training forward keeping x_norm, 22 MB,
         * in the class 8x128x52x52's forward had decided to stream, 4-5x
         * slower than with plain stores) */
        trial->stream = e->decided == STREAM_FIXED ? fixed_stream : e->decided && layout_ok;
        if (e->group < 0 && group_free) { /* then the group sizes, in turn, with the stores kept */
            int call = e->group_calls++, c = call / GROUP_TRIAL_CALLS;
            if (c >= GROUP_CHOICES) c = 0; /* calls from other threads while the last timings run */
            trial->group_bytes >>= c;
            trial->choice = c;
            if (call % GROUP_TRIAL_CALLS) trial->slot = s, trial->timing = DNBN_TIMING_GROUP;
        } else if (e->group > 0 && grouped) {
            trial->group_bytes >>= e->group;
        }
    } /* else the stores are being timed on other layers' calls, and this one
       * cannot stream (its rows are not whole lines): plain, untimed */
    pthread_mutex_unlock(&streaming.lock);
    if (trial->slot >= 0) trial->start = now_ns();
    return trial->stream;
}

void dnbn_trial_end(const dnbn_trial *trial)
{
    if (trial->slot < 0) return;
    double took = now_ns() - trial->start;
    pthread_mutex_lock(&streaming.lock);
    stream_slot *e = &streaming.slot[trial->slot];
    if (trial->timing == DNBN_TIMING_STREAM && e->decided == -1) {
        int c = trial->stream;
        if (e->timed[c]++ == 0 || took < e->best[c]) e->best[c] = took;
        if (e->timed[0] >= STREAM_TRIALS && e->timed[1] >= STREAM_TRIALS)
            e->decided = e->best[1] < STREAM_MARGIN * e->best[0];
    } else if (trial->timing == DNBN_TIMING_GROUP && e->group < 0) {
        int c = trial->choice, done = 1;
        if (e->group_timed[c]++ == 0 || took < e->group_best[c]) e->group_best[c] = took;
        for (int k = 0; k < GROUP_CHOICES; k++) done &= e->group_timed[k] >= GROUP_TRIAL_CALLS - 1;
        if (done) {
            int best = 0;
            for (int k = 1; k < GROUP_CHOICES; k++)
                if (e->group_best[k] < e->group_best[best]) best = k;
            e->group = e->group_best[best] < GROUP_MARGIN * e->group_best[0] ? best : 0;
        }
    }
    pthread_mutex_unlock(&streaming.lock);
}

/* ---- the report ---- */

static const char *pass_names[DNBN_PASSES] = {"forward_train", "forward_infer", "backward", "fill_x_norm",
                                              "forward_apply", "backward_apply"};

/* Text appended to buf[0 .. size), always NUL-terminated; n counts what the whole text needs. */
typedef struct text_out {
    char *buf;
    int size, n;
} text_out;

static void put(text_out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(text_out *o, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int room = o->n < o->size ? o->size - o->n : 0;
    char scratch[1];
    int k = vsnprintf(room ? o->buf + o->n : scratch, room ? (size_t)room : 1, fmt, ap);
    va_end(ap);
    if (k > 0) o->n += k;
}

int dnbn_tuning_report(char *buf, int size)
{
    text_out o = {buf, buf && size > 0 ? size : 0, 0};
    if (o.size) buf[0] = '\0';
    dnbn_group_bytes();
    pthread_mutex_lock(&streaming.lock);
    stream_mode_init();
    put(&o, "{\"simd\": \"%s\", \"team\": \"%s\", \"l2_bytes\": %ld, \"l3_bytes\": %ld, ", dnbn_simd_path(),
        dnbn_get_team() ? "external" : "pool", caches.l2, caches.l3);
    put(&o, "\"group_bytes\": %lld, \"group_source\": \"%s\", ", (long long)caches.group_bytes,
        caches.group_source);
    put(&o, "\"min_work_per_thread\": %lld, \"min_work_source\": \"%s\", ", (long long)atomic_load(&min_work),
        cal.source);
    put(&o, "\"wake_us\": %.2f, \"value_ns\": %.4f, \"calibration_threads\": %d, ", cal.wake_ns / 1e3,
        cal.value_ns, cal.threads);
    put(&o, "\"stream\": \"%s\", \"stream_source\": \"%s\", \"stream_min_bytes\": %lld, \"stream_decisions\": [",
        streaming.mode == DNBN_STREAM_ALWAYS ? "always" : streaming.mode == DNBN_STREAM_NEVER ? "never" : "auto",
        streaming.source, (long long)STREAM_MIN_BYTES);
    const char *sep = "";
    for (int s = 0; s < STREAM_SLOTS; s++) {
        const stream_slot *e = &streaming.slot[s];
        if (!e->used) continue;
        put(&o,
            "%s{\"pass\": \"%s\", \"bytes_at_least\": %lld, \"threads\": %d, \"choice\": \"%s\", "
            "\"trial_calls\": %d, \"plain_ms\": %.4f, \"stream_ms\": %.4f, ",
            sep, pass_names[e->pass], (long long)1 << e->log2_bytes, e->threads,
            e->decided == STREAM_FIXED ? "fixed" : e->decided < 0 ? "trying" : e->decided ? "stream" : "plain",
            e->calls + e->group_calls,
            e->best[0] / 1e6, e->best[1] / 1e6);
        if (e->group < 0 && e->grouped)
            put(&o, "\"group_kb\": \"trying\", ");
        else /* decided, or no call in this class had channel groups: the size from the cache */
            put(&o, "\"group_kb\": %lld, ", (long long)(caches.group_bytes >> (e->group > 0 ? e->group : 0)) >> 10);
        put(&o, "\"group_ms\": [");
        for (int k = 0; k < GROUP_CHOICES; k++)
            put(&o, "%s{\"group_kb\": %lld, \"ms\": %.4f}", k ? ", " : "",
                (long long)(caches.group_bytes >> k) >> 10, e->group_timed[k] ? e->group_best[k] / 1e6 : 0.0);
        put(&o, "]}");
        sep = ", ";
    }
    put(&o, "]}");
    pthread_mutex_unlock(&streaming.lock);
    return o.n;
}
