// Writes argv[1] and a newline to stdout, argv[2] and a newline to stderr, exits with argv[3].

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc > 1) printf("%s\n", argv[1]);
    fflush(stdout);
    if (argc > 2) fprintf(stderr, "%s\n", argv[2]);
    return argc > 3 ? atoi(argv[3]) : 0;
}
