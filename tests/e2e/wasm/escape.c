// Tries to open each path given; prints "<path>: opened" or "<path>: <error>". The exit code
// is the number of paths that opened.
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int opened = 0;
    for (int i = 1; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY);
        if (fd >= 0) {
            printf("%s: opened\n", argv[i]);
            close(fd);
            opened++;
        } else {
            printf("%s: %s\n", argv[i], strerror(errno));
        }
    }
    return opened;
}
