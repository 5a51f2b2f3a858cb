/*
 * threads.c - the thread-count setting and a fork-safe parallel_for.
 *
 * The thread count is the library's only mutable global. Threads are created
 * for a call and joined before it returns: no pool outlives a call, so a child
 * process after fork() starts clean and two callers never share workers.
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

void dnbn_parallel_for(idx_t n, int threads, dnbn_range_fn fn, void *ctx)
{
    if (n <= 0) return;
    if (threads > n) threads = (int)n;
    if (threads <= 1) {
        fn(ctx, 0, n);
        return;
    }
    if (threads > DNBN_MAX_THREADS) threads = DNBN_MAX_THREADS;

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
