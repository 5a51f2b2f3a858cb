/* rows_avx2.c - the row primitives compiled for AVX2 and FMA. Only called after
 * dispatch.c has checked that the CPU has both. */
#include "internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma")
#include <immintrin.h>
#define ROWS_AVX2 1
#define ROWS(name) name##_avx2
#include "rows.inc.h"
#include "phases.inc.h"

const dnbn_rows dnbn_rows_avx2 = ROWS_TABLE("avx2");
#else
const dnbn_rows dnbn_rows_avx2 = {0}; /* never chosen off x86-64 */
#endif
