/*
 * threads.c - the thread-count setting and parallel_for on a pool of
 * persistent, sleeping worker threads (fork-safe; see "the pool" below).
 *
 * Mutable globals: the thread count and the pool.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"

/* Below this many element operations per thread a call stays on one thread:
 * creating a thread costs about as much as touching this many floats. */
#define MIN_WORK_PER_THREAD ((idx_t)1 << 17)

static atomic_int num_threads; /* 0 until first read: then the default */

/* ---- the pool ----
 * Workers 1 .. workers-1 are created on first use and sleep on a condition
 * variable between calls (no spinning: they leave the cores to others). A
 * call posts a job, a new generation wakes them, worker k runs range k of
 * `parts` while the caller runs range 0, and the caller sleeps until the last
 * one is done. One caller owns the pool at a time (`busy`); a concurrent
 * caller runs on transient threads instead. Workers above the thread setting
 * exit when it is lowered. fork(): the prepare handler takes the lock, so the
 * child inherits a consistent pool; its workers do not exist there, so the
 * child starts with none (and no owner) and creates them again on first use. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    int workers;              /* started worker threads, numbered 1 .. workers */
    int busy;                 /* a caller owns the pool */
    unsigned long generation; /* bumped per job */
    int parts, pending;       /* the job's ranges; workers still running it */
    dnbn_range_fn fn;
    void *ctx;
    idx_t n;
    unsigned long born[DNBN_MAX_THREADS]; /* generation when worker k was created: its first job is the next */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, NULL,
          NULL, 0, {0}};


static int default_threads(void)
{
    const char *env = getenv("DARKNET_BN_NUM_THREADS");
    if (env && *env) {
        char *end;
        long n = strtol(env, &end, 10);
        if (*end == '\0' && n >= 1) return n > DNBN_MAX_THREADS ? DNBN_MAX_THREADS : (int)n;
    }
    cpu_set_t set;
    int n = 1;
    if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
    if (n < 1) n = 1;
    return n > DNBN_MAX_THREADS ? DNBN_MAX_THREADS : n;
}

int dnbn_set_num_threads(int n)
{
    if (n < 1) return DNBN_ERR_ARG;
    atomic_store(&num_threads, n > DNBN_MAX_THREADS ? DNBN_MAX_THREADS : n);
    pthread_mutex_lock(&pool.lock); /* workers above the new count exit */
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    return DNBN_OK;
}

int dnbn_get_num_threads(void)
{
    int n = atomic_load(&num_threads);
    if (n == 0) {
        int expected = 0;
        n = default_threads();
        if (!atomic_compare_exchange_strong(&num_threads, &expected, n)) n = expected;
    }
    return n;
}

int dnbn_threads_for(idx_t work)
{
    idx_t t = work / MIN_WORK_PER_THREAD;
    int n = dnbn_get_num_threads();
    if (t < 1) return 1;
    return t < n ? (int)t : n;
}

typedef struct range_task {
    dnbn_range_fn fn;
    void *ctx;
    idx_t lo, hi;
} range_task;

static void *run_range(void *arg)
{
    range_task *t = arg;
    t->fn(t->ctx, t->lo, t->hi);
    return NULL;
}

/* Threads created for one call and joined before it returns: what a call
 * that finds the pool busy (another thread of the process is in a parallel
 * call) uses, as the library did before it had a pool. */
static void transient_for(idx_t n, int threads, dnbn_range_fn fn, void *ctx)
{
    range_task tasks[DNBN_MAX_THREADS];
    pthread_t ids[DNBN_MAX_THREADS];
    int started[DNBN_MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        tasks[t] = (range_task){fn, ctx, n * t / threads, n * (t + 1) / threads};
        started[t] = 0;
    }
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], NULL, run_range, &tasks[t]) == 0;
    run_range(&tasks[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            run_range(&tasks[t]); /* could not start a thread: do its share here */
    }
}

static void *worker_main(void *arg)
{
    int k = (int)(intptr_t)arg;
    pthread_mutex_lock(&pool.lock);
    unsigned long seen = pool.born[k];
    for (;;) {
        while (pool.generation == seen && k < dnbn_get_num_threads()) pthread_cond_wait(&pool.wake, &pool.lock);
        if (pool.generation == seen) { /* the setting dropped below this worker, and no job is for it */
            if (k == pool.workers) { /* only the highest exits, so workers stay 1 .. workers */
                pool.workers--;
                pthread_cond_broadcast(&pool.wake); /* the next one down may exit too */
                pthread_mutex_unlock(&pool.lock);
                return NULL;
            }
            pthread_cond_wait(&pool.wake, &pool.lock);
            continue;
        }
        seen = pool.generation;
        if (k >= pool.parts) continue;
        dnbn_range_fn fn = pool.fn;
        void *ctx = pool.ctx;
        idx_t lo = pool.n * k / pool.parts, hi = pool.n * (k + 1) / pool.parts;
        pthread_mutex_unlock(&pool.lock);
        fn(ctx, lo, hi);
        pthread_mutex_lock(&pool.lock);
        if (--pool.pending == 0) pthread_cond_signal(&pool.done);
    }
}

static void fork_prepare(void) { pthread_mutex_lock(&pool.lock); }
static void fork_parent(void) { pthread_mutex_unlock(&pool.lock); }
static void fork_child(void)
{
    pool.workers = 0;
    pool.busy = 0;
    pool.pending = 0;
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pthread_mutex_unlock(&pool.lock);
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(fork_prepare, fork_parent, fork_child); }

/* Workers up to `want` - 1 (called with the lock held); returns how many exist. */
static int grow_pool(int want)
{
    while (pool.workers < want - 1) {
        pthread_t id;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pool.born[pool.workers + 1] = pool.generation;
        int ok = pthread_create(&id, &attr, worker_main, (void *)(intptr_t)(pool.workers + 1)) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool.workers++;
    }
    return pool.workers;
}

void dnbn_parallel_for(idx_t n, int threads, dnbn_range_fn fn, void *ctx)
{
    if (n <= 0) return;
    if (threads > n) threads = (int)n;
    if (threads > DNBN_MAX_THREADS) threads = DNBN_MAX_THREADS;
    if (threads <= 1) {
        fn(ctx, 0, n);
        return;
    }
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&pool.lock);
    if (pool.busy) {
        pthread_mutex_unlock(&pool.lock);
        transient_for(n, threads, fn, ctx);
        return;
    }
    int workers = grow_pool(threads);
    if (workers < threads - 1) threads = workers + 1; /* could not start them all: fewer, larger ranges */
    pool.busy = 1;
    pool.fn = fn, pool.ctx = ctx, pool.n = n;
    pool.parts = threads;
    pool.pending = threads - 1;
    pool.generation++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);

    fn(ctx, 0, n / threads);

    pthread_mutex_lock(&pool.lock);
    while (pool.pending > 0) pthread_cond_wait(&pool.done, &pool.lock);
    pool.busy = 0;
    pthread_mutex_unlock(&pool.lock);
}
