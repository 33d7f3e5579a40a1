// Writes the given number of MiB of 'x' to stdout.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    static char chunk[1 << 20];
    memset(chunk, 'x', sizeof chunk);
    long mib = argc > 1 ? atol(argv[1]) : 1;
    for (long i = 0; i < mib; i++)
        if (fwrite(chunk, 1, sizeof chunk, stdout) != sizeof chunk) return 1;
    return 0;
}
