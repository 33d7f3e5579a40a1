// Prints "tick<n>" every 0.2 s, forever: a running container whose output keeps coming.
#include <stdio.h>
#include <time.h>

int main(void) {
    struct timespec pause = {0, 200 * 1000 * 1000};
    for (unsigned long i = 1;; i++) {
        printf("tick%lu\n", i);
        fflush(stdout);
        nanosleep(&pause, NULL);
    }
}
