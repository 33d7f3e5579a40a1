// Spins forever. With a path argument it rewrites that file with its round count, so that its
// progress can be watched from outside.
#include <stdio.h>

int main(int argc, char **argv) {
    volatile unsigned long spins = 0;  // volatile: an empty infinite loop may be optimized out
    for (unsigned long round = 1;; round++) {
        for (unsigned long i = 0; i < 10000000; i++) spins++;
        if (argc > 1) {
            FILE *progress = fopen(argv[1], "w");
            if (progress) {
                fprintf(progress, "%lu\n", round);
                fclose(progress);
            }
        }
    }
}
