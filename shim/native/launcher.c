/* containerd-shim-py*-v1: `start` and `delete` relayed to the warm template without starting
 * an interpreter. The client side of the relay protocol (docs/ARCHITECTURE.md), as
 * shim/relay.py is in Python. Anything else (another action, -v, -info, no template that
 * acks, a request it cannot build) execs the Python entry point PYTHON_ENTRY, found next to
 * this program's real path, with the same argv; it spawns a template when none listens.
 *
 * Tiny on purpose: fixed-size buffers, no allocation, every syscall checked. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define SOCKET_DIR "/run/containerd/s"
#define TEMPLATE_PREFIX "pyshim-template-"
#define PYTHON_ENTRY "pyshim-shim"
#define MESSAGE_MAX (1 << 20)
#define REPLY_TIMEOUT_S 60
#define WORD 4
#define EXIT_MAX 255
#define ARGS_MAX 1024

extern char **environ;

static const char *program = "pyshim launcher"; /* basename of argv[0], for messages */
static char request[MESSAGE_MAX];

/* ---- SHA-256 (FIPS 180-4), enough for the template's key ---- */

struct sha256 {
    uint32_t state[8];
    uint64_t length;
    unsigned char block[64];
    size_t used;
};

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2,
};

static uint32_t ror(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha256_block(struct sha256 *h)
{
    uint32_t w[64], v[8];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)h->block[4 * i] << 24 | (uint32_t)h->block[4 * i + 1] << 16 |
               (uint32_t)h->block[4 * i + 2] << 8 | h->block[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    memcpy(v, h->state, sizeof v);
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = v[7] + (ror(v[4], 6) ^ ror(v[4], 11) ^ ror(v[4], 25)) +
                      ((v[4] & v[5]) ^ (~v[4] & v[6])) + K[i] + w[i];
        uint32_t t2 = (ror(v[0], 2) ^ ror(v[0], 13) ^ ror(v[0], 22)) +
                      ((v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]));
        memmove(v + 1, v, 7 * sizeof v[0]);
        v[4] += t1;
        v[0] = t1 + t2;
    }
    for (int i = 0; i < 8; i++)
        h->state[i] += v[i];
}

static void sha256_init(struct sha256 *h)
{
    static const uint32_t initial[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                        0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(h->state, initial, sizeof initial);
    h->length = 0;
    h->used = 0;
}

static void sha256_update(struct sha256 *h, const void *data, size_t size)
{
    const unsigned char *bytes = data;
    h->length += size;
    while (size--) {
        h->block[h->used++] = *bytes++;
        if (h->used == sizeof h->block) {
            sha256_block(h);
            h->used = 0;
        }
    }
}

static void sha256_final(struct sha256 *h, unsigned char digest[32])
{
    uint64_t bits = h->length * 8;
    unsigned char pad = 0x80, length[8];
    for (int i = 0; i < 8; i++)
        length[i] = (unsigned char)(bits >> (56 - 8 * i));
    sha256_update(h, &pad, 1);
    pad = 0;
    while (h->used != 56)
        sha256_update(h, &pad, 1);
    sha256_update(h, length, sizeof length);
    for (int i = 0; i < 32; i++)
        digest[i] = (unsigned char)(h->state[i / 4] >> (24 - 8 * (i % 4)));
}

/* ---- what shim/flags.py parse_flags finds ---- */

#ifndef VALUE_FLAGS /* shim.flags.VALUE_FLAGS, as string literals: given by shim/native/build.py */
#error "build the launcher with shim/native/build.py"
#endif

/* Whether the flag `name` (len bytes, leading dashes stripped) is `key`; `-` and `_` match. */
static int flag_is(const char *name, size_t len, const char *key)
{
    if (strlen(key) != len)
        return 0;
    for (size_t i = 0; i < len; i++)
        if ((name[i] == '-' ? '_' : name[i]) != key[i])
            return 0;
    return 1;
}

static int is_value_flag(const char *name, size_t len)
{
    static const char *const value_flags[] = {VALUE_FLAGS};
    for (size_t i = 0; i < sizeof value_flags / sizeof value_flags[0]; i++)
        if (flag_is(name, len, value_flags[i]))
            return 1;
    return 0;
}

/* 1 when argv asks for `start` or `delete` (and neither -v nor -info), with its -address;
 * 0 when Python has to answer (also for a usage error: Python prints it). */
static int relayable(int argc, char **argv, const char **address)
{
    const char *action = "";
    *address = "";
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--") == 0)
            break;
        if (arg[0] != '-' || arg[1] == '\0') {
            action = arg;
            break;
        }
        const char *name = arg + strspn(arg, "-");
        const char *equals = strchr(name, '=');
        size_t len = equals ? (size_t)(equals - name) : strlen(name);
        if (flag_is(name, len, "v") || flag_is(name, len, "info")) {
            if (!equals || strcmp(equals + 1, "1") == 0 || strcasecmp(equals + 1, "t") == 0 ||
                strcasecmp(equals + 1, "true") == 0)
                return 0;
        } else if (is_value_flag(name, len)) {
            const char *value = equals ? equals + 1 : (i + 1 < argc ? argv[++i] : NULL);
            if (value == NULL)
                return 0;
            if (flag_is(name, len, "address"))
                *address = value;
        }
    }
    return strcmp(action, "start") == 0 || strcmp(action, "delete") == 0;
}

/* ---- the protocol ---- */

/* The template's socket path for this program and containerd address (relay.template_path);
 * 0, or -1 when this program has no path to key it by. */
static int template_path(const char *argv0, const char *address, char path[108])
{
    char real[PATH_MAX], mtime[32], hex[65];
    unsigned char digest[32];
    struct stat st;
    struct sha256 h;
    if (realpath(argv0, real) == NULL || stat(real, &st) != 0)
        return -1;
    snprintf(mtime, sizeof mtime, "%lld",
             (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec);
    sha256_init(&h);
    sha256_update(&h, address, strlen(address) + 1); /* each part ended by its NUL */
    sha256_update(&h, real, strlen(real) + 1);
    sha256_update(&h, mtime, strlen(mtime));
    sha256_final(&h, digest);
    for (int i = 0; i < 16; i++)
        snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    snprintf(path, 108, "%s/%s%s", SOCKET_DIR, TEMPLATE_PREFIX, hex);
    return 0;
}

static int put(size_t *used, const void *data, size_t size)
{
    if (size > sizeof request - *used)
        return -1;
    memcpy(request + *used, data, size);
    *used += size;
    return 0;
}

/* argc, envc, then argv, cwd and the environment, each string with its NUL; its size, or -1
 * when it does not fit in MESSAGE_MAX. */
static ssize_t encode_request(int argc, char **argv)
{
    char cwd[PATH_MAX];
    int32_t count = argc, envc = 0;
    size_t used = 2 * WORD;
    if (getcwd(cwd, sizeof cwd) == NULL)
        return -1;
    for (int i = 0; i < argc; i++)
        if (put(&used, argv[i], strlen(argv[i]) + 1) != 0)
            return -1;
    if (put(&used, cwd, strlen(cwd) + 1) != 0)
        return -1;
    for (char **entry = environ; *entry != NULL; entry++, envc++)
        if (put(&used, *entry, strlen(*entry) + 1) != 0)
            return -1;
    memcpy(request, &count, WORD);
    memcpy(request + WORD, &envc, WORD);
    return (ssize_t)used;
}

/* A reply's value (the ack's pid, or the result's exit code), or -1 when it is malformed. */
static int decode_reply(const char *data, ssize_t size, int32_t maximum)
{
    int32_t value;
    if (size != WORD)
        return -1;
    memcpy(&value, data, WORD);
    return value < 0 || value > maximum ? -1 : value;
}

/* ---- the two ways out ---- */

static void exec_python(char **argv)
{
    char self[PATH_MAX], entry[PATH_MAX];
    char *args[ARGS_MAX + 2];
    ssize_t size = readlink("/proc/self/exe", self, sizeof self - 1);
    int argc = 0;
    if (size < 0) {
        fprintf(stderr, "%s: /proc/self/exe: %s\n", program, strerror(errno));
        exit(1);
    }
    self[size] = '\0';
    *strrchr(self, '/') = '\0'; /* the kernel's path is absolute */
    if (snprintf(entry, sizeof entry, "%s/%s", self, PYTHON_ENTRY) >= (int)sizeof entry) {
        fprintf(stderr, "%s: %s/%s: path too long\n", program, self, PYTHON_ENTRY);
        exit(1);
    }
    /* The interpreter's argv replaces ours, so our argv[0] goes along as its first argument. */
    args[0] = entry;
    for (; argv[argc] != NULL; argc++) {
        if (argc == ARGS_MAX) {
            fprintf(stderr, "%s: more than %d arguments\n", program, ARGS_MAX);
            exit(2);
        }
        args[argc + 1] = argv[argc];
    }
    args[argc + 1] = NULL;
    execv(entry, args);
    fprintf(stderr, "%s: exec %s: %s\n", program, entry, strerror(errno));
    exit(1);
}

/* recv and sendmsg again after a signal (SIGSTOP/SIGCONT interrupt them even without a
 * handler on a socket with a timeout), as the Python client does (PEP 475). */
static ssize_t recv_whole(int conn, void *buffer, size_t size)
{
    ssize_t got;
    do
        got = recv(conn, buffer, size, 0);
    while (got < 0 && errno == EINTR);
    return got;
}

static ssize_t send_whole(int conn, const struct msghdr *msg)
{
    ssize_t sent;
    do
        sent = sendmsg(conn, msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    return sent;
}

/* Once the template acked, the command is done there or not at all: never run it again. */
static int result(int conn)
{
    char reply[16];
    ssize_t size = recv_whole(conn, reply, sizeof reply);
    int code = decode_reply(reply, size, EXIT_MAX);
    if (size < 0)
        fprintf(stderr, "%s: %s\n", program, strerror(errno));
    else if (size == 0)
        fprintf(stderr, "%s: the shim template's worker died\n", program);
    else if (code < 0)
        fprintf(stderr, "%s: malformed reply from the shim template\n", program);
    return code < 0 ? 1 : code;
}

/* The exit code of the command the template did, or -1 when no template took it. */
static int relay(int argc, char **argv, const char *address)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct timeval timeout = {.tv_sec = REPLY_TIMEOUT_S};
    int fds[3] = {0, 1, 2};
    union {
        char bytes[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } control;
    char ack[16];
    ssize_t size = encode_request(argc, argv);
    if (size < 0 || template_path(argv[0], address, addr.sun_path) != 0)
        return -1;
    struct iovec iov = {.iov_base = request, .iov_len = (size_t)size};
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.bytes, .msg_controllen = sizeof control.bytes};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);

    int conn = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (conn < 0)
        return -1;
    if (setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) != 0 ||
        setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout) != 0 ||
        connect(conn, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        send_whole(conn, &msg) != size) {
        close(conn);
        return -1;
    }
    size = recv_whole(conn, ack, sizeof ack);
    int code = -1; /* no ack (size <= 0): nothing was done */
    if (size > 0 && decode_reply(ack, size, INT32_MAX) < 0) {
        fprintf(stderr, "%s: malformed reply from the shim template\n", program);
        code = 1;
    } else if (size > 0) {
        code = result(conn);
    }
    close(conn);
    return code;
}

int main(int argc, char **argv)
{
    const char *address;
    if (argc < 1)
        return 2;
    program = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
    if (relayable(argc, argv, &address)) {
        int code = relay(argc, argv, address);
        if (code >= 0)
            return code;
    }
    exec_python(argv);
    return 1;
}
