// The in-batch CPU kernel for any x86-64 (or other) CPU; see cpu.cc.
// Eigen gets a namespace of its own in each build of the kernel: its
// templates are inline functions, and the linker keeps one copy of each
// across translation units, which would mix the builds' instruction sets.
#define Eigen fc_generic_Eigen
#define FC_IN_BATCH_ISA generic
#include "core/in_batch/cpu_entry.h"
