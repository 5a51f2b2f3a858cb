/*
 * threads.c - the thread-count setting and parallel_for on a pool of
 * persistent, sleeping worker threads (fork-safe; see "the pool" below).
 *
 * Mutable globals: the thread count, the pool, and the team that replaces
 * the pool when another library's is given (dnbn_set_team).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"

static atomic_int num_threads; /* 0 until first read: then the default */
static _Atomic(dnbn_team_run) team; /* NULL: the pool */

/* ---- the pool ----
 * Workers 1 .. workers-1 are created on first use and sleep on a condition
 * variable between calls (no spinning: they leave the cores to others). A
 * call posts a job and a new generation wakes them; the range [0, n) is then
 * handed out in chunks from a shared counter, to the caller and to every
 * worker that wakes while chunks are left. The caller starts at once and never
 * waits for a worker to wake: a worker that comes late (its core busy with
 * other threads, say another library's spinning workers) finds the job closed
 * and goes back to sleep, so more threads cost at most the wake-up call. The
 * caller then sleeps until the workers that joined have finished their
 * chunks. One caller owns the pool at a time (`busy`); a concurrent caller
 * runs on transient threads instead. Workers above the thread setting exit
 * when it is lowered. fork(): the prepare handler takes the lock, so the
 * child inherits a consistent pool; its workers do not exist there, so the
 * child starts with none (and no owner) and creates them again on first use. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    int workers;              /* started worker threads, numbered 1 .. workers */
    int busy;                 /* a caller owns the pool */
    unsigned long generation; /* bumped per job */
    int parts;                /* threads the job may use: workers 1 .. parts-1 may join */
    int open;                 /* workers may still join the job */
    int joined;               /* workers inside the job */
    dnbn_range_fn fn;
    void *ctx;
    idx_t n, chunk;
    atomic_llong next;                    /* the next unclaimed index of [0, n) */
    unsigned long born[DNBN_MAX_THREADS]; /* generation when worker k was created: its first job is the next */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, NULL,
          NULL, 0, 0, 0, {0}};

/* Claims chunks of [0, n) from the counter *next until none is left. */
static void run_chunks(dnbn_range_fn fn, void *ctx, idx_t n, idx_t chunk, atomic_llong *next)
{
    for (;;) {
        idx_t lo = (idx_t)atomic_fetch_add(next, chunk);
        if (lo >= n) return;
        fn(ctx, lo, lo + chunk < n ? lo + chunk : n);
    }
}

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
    int n = dnbn_get_num_threads();
    if (n < 2) return 1;
    idx_t t = work / dnbn_min_work_per_thread(n);
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
        if (!pool.open || k >= pool.parts) continue; /* too late, or not wanted */
        pool.joined++;
        dnbn_range_fn fn = pool.fn;
        void *ctx = pool.ctx;
        idx_t n = pool.n, chunk = pool.chunk;
        pthread_mutex_unlock(&pool.lock);
        run_chunks(fn, ctx, n, chunk, &pool.next);
        pthread_mutex_lock(&pool.lock);
        if (--pool.joined == 0 && !pool.open) pthread_cond_signal(&pool.done);
    }
}

static void fork_prepare(void) { pthread_mutex_lock(&pool.lock); }
static void fork_parent(void) { pthread_mutex_unlock(&pool.lock); }
static void fork_child(void)
{
    atomic_store(&team, NULL); /* the other library's threads do not exist here either */
    pool.workers = 0;
    pool.busy = 0;
    pool.open = 0;
    pool.joined = 0;
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

void dnbn_set_team(dnbn_team_run run)
{
    pthread_once(&atfork_once, register_atfork);
    atomic_store(&team, run);
}

dnbn_team_run dnbn_get_team(void) { return atomic_load(&team); }

/* About two chunks per thread: late joiners still find work, no thread waits
 * long for the last chunk, and a fused phase walks all but the first unit of
 * a chunk beside the unit before it (phases.inc.h). With four, half the units
 * of 16x512x13x13 at 2 threads were first in their chunk; two took its step
 * from 1.02 to 0.94 ms and 8x128x52x52's from 2.06 to 1.91 ms (medians of 5,
 * alternating builds). */
static idx_t chunk_for(idx_t n, int threads) { return n / (2 * (idx_t)threads) > 1 ? n / (2 * (idx_t)threads) : 1; }

/* A job on another library's team: every member claims chunks of [0, n). */
typedef struct team_job {
    dnbn_range_fn fn;
    void *ctx;
    idx_t n, chunk;
    atomic_llong next;
} team_job;

static void team_body(void *arg)
{
    team_job *job = arg;
    run_chunks(job->fn, job->ctx, job->n, job->chunk, &job->next);
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
    dnbn_team_run run = atomic_load(&team);
    if (run) {
        team_job job = {fn, ctx, n, chunk_for(n, threads), 0};
        run(team_body, &job, (unsigned)threads, 0);
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
    if (workers < threads - 1) threads = workers + 1; /* could not start them all */
    pool.busy = 1;
    pool.fn = fn, pool.ctx = ctx, pool.n = n;
    idx_t chunk = chunk_for(n, threads);
    pool.chunk = chunk;
    atomic_store(&pool.next, 0);
    pool.parts = threads;
    pool.open = 1;
    pool.joined = 0;
    pool.generation++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);

    run_chunks(fn, ctx, n, chunk, &pool.next);

    pthread_mutex_lock(&pool.lock);
    pool.open = 0; /* the counter is spent: nobody else joins */
    while (pool.joined > 0) pthread_cond_wait(&pool.done, &pool.lock);
    pool.busy = 0;
    pthread_mutex_unlock(&pool.lock);
}
