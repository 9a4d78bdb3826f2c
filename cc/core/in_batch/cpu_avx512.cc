// The in-batch CPU kernel built for AVX-512 (F, VL, DQ, BW) with FMA
// (CMakeLists.txt, BUILD): Eigen's GEMM then runs 16-wide fused
// multiply-adds, which CPUs with full-width AVX-512 units (AMD Zen 5, Intel
// server cores) issue at twice the AVX2 rate. core/in_batch/cpu.cc calls it
// only on CPUs with all of them.
#define Eigen fc_avx512_Eigen
#define FC_IN_BATCH_ISA avx512
#include "core/in_batch/cpu_entry.h"
