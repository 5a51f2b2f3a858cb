/* rows_generic.c - the row primitives for any CPU (baseline instruction set). */
#include "internal.h"

#define ROWS(name) name##_generic
#include "rows.inc.h"
#include "phases.inc.h"

const dnbn_rows dnbn_rows_generic = ROWS_TABLE("generic");
