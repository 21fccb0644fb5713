/* BPF programs here are built little-endian (-target bpfel). */
#include <linux/byteorder/little_endian.h>
