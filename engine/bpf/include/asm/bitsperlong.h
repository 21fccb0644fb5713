/* BPF has no arch headers of its own: the generic ones fit it. */
#include <asm-generic/bitsperlong.h>
