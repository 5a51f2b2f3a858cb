/*
 * dispatch.c - the instruction-set path, chosen once at run time, plus the
 * version and error strings.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#ifndef DNBN_VERSION
#define DNBN_VERSION "0.1.0"
#endif

static const dnbn_rows *active;
static pthread_once_t active_once = PTHREAD_ONCE_INIT;

static void choose_rows(void)
{
    const char *want = getenv("DARKNET_BN_SIMD");
    active = &dnbn_rows_generic;
    if (want && strcmp(want, "generic") == 0) return;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) active = &dnbn_rows_avx2;
#endif
}

const dnbn_rows *dnbn_rows_active(void)
{
    pthread_once(&active_once, choose_rows);
    return active;
}

const char *dnbn_simd_path(void) { return dnbn_rows_active()->name; }

const char *dnbn_version(void) { return DNBN_VERSION; }

const char *dnbn_kernel_flavor(void) { return DNBN_FLAVOR; }

const char *dnbn_strerror(int status)
{
    switch (status) {
    case DNBN_OK: return "success";
    case DNBN_ERR_ARG: return "argument out of range";
    case DNBN_ERR_NOMEM: return "out of memory";
    case DNBN_ERR_STATE: return "call does not fit the layer's state";
    default: return "unknown status";
    }
}
