// Copies each file named in its arguments, or stdin when there is none, to stdout.
#include <stdio.h>

static int copy(FILE *in) {
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, n, stdout) != n) return 1;
    return ferror(in) ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return copy(stdin);
    for (int i = 1; i < argc; i++) {
        FILE *in = fopen(argv[i], "r");
        if (!in) {
            perror(argv[i]);
            return 1;
        }
        int failed = copy(in);
        fclose(in);
        if (failed) return 1;
    }
    return 0;
}
