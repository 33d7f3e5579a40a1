// Allocates and touches memory 1 MiB at a time until the cgroup's OOM killer ends it. Exits 3
// if an allocation fails first (the engine's memory limit was reached before the cgroup's).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *volatile last;  // escapes each chunk, so the allocations are not optimized out

int main(void) {
    for (unsigned long mib = 0;; mib++) {
        last = malloc(1 << 20);
        if (!last) {
            fprintf(stderr, "allocation failed after %lu MiB\n", mib);
            return 3;
        }
        memset(last, 'x', 1 << 20);
    }
}
