// The in-batch CPU kernel built with -mavx2 -mfma (CMakeLists.txt, BUILD):
// Eigen's GEMM then runs 8-wide fused multiply-adds, about 3x its SSE2 speed
// on this project's machines. core/in_batch/cpu.cc calls it only on CPUs with both.
#define Eigen fc_avx2_Eigen
#define FC_IN_BATCH_ISA avx2
#include "core/in_batch/cpu_entry.h"
