// See highwayhash.h in this directory.
#include "highwayhash/highwayhash.h"
