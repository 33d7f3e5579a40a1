// Sleeps (argv[1] seconds, default forever): a running container that costs no CPU, for
// scripts/bench's memory figure.
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    unsigned seconds = argc > 1 ? (unsigned)atoi(argv[1]) : 1000000;
    for (;;) sleep(seconds);
}
