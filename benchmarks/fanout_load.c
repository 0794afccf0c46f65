/* Client load for bench_gateway, in C: the same protocol as _fanout_load.py
 * (read its docstring), at a fraction of the cost per message, so that the
 * server being measured, not the load, is what takes the time.
 *
 * One epoll loop over non-blocking sockets; each client does the opening
 * handshake, sends a masked subscribe frame, is ready at a text frame that
 * contains "subscribed", answers pings, and counts the marker n=<number>; of
 * every text frame after that. Lines on stdout: "ready <seconds>",
 * "got <n> <CLOCK_MONOTONIC seconds>" (the clock of Python's
 * time.monotonic()), "lost <count>". Stops on "quit" or end of file on stdin.
 *
 * Built by bench_gateway.py with the system's C compiler (cc -O2); usage:
 * fanout_load N PORT SOURCE_ADDRESS. Loopback only; every wait is bounded.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define IN_FLIGHT 256
#define CONNECT_TIMEOUT 300.0
#define MAX_MARK (1 << 20)
#define READ_SIZE (256 * 1024)

enum { CONNECTING, UPGRADING, SUBSCRIBING, LIVE, CLOSED };

typedef struct {
    int fd;
    int state;
    char *buf; /* a partial frame or response kept between reads */
    size_t len;
} Conn;

static const unsigned char KEY[4] = {0x12, 0x34, 0x56, 0x78};
static int counts[MAX_MARK];
static int n_clients;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "fanout_load: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* A masked client frame of opcode op; len < 126. */
static size_t masked(unsigned char *out, int op, const unsigned char *data, size_t len) {
    out[0] = 0x80 | op;
    out[1] = 0x80 | (unsigned char)len;
    memcpy(out + 2, KEY, 4);
    for (size_t i = 0; i < len; i++) out[6 + i] = data[i] ^ KEY[i % 4];
    return 6 + len;
}

static void send_all(int fd, const void *data, size_t len) {
    /* Small writes to a socket that has room: a short write is a failure. */
    ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
    if (n != (ssize_t)len) {
        fprintf(stderr, "fanout_load: short send (%zd of %zu)\n", n, len);
        exit(1);
    }
}

static int ready_count;

/* Handle the complete frames at the start of data; return the bytes used. */
static size_t on_frames(Conn *c, const unsigned char *data, size_t size) {
    size_t pos = 0;
    while (size - pos >= 2) {
        size_t len = data[pos + 1] & 0x7F, start = pos + 2;
        if (len == 126) {
            if (size - pos < 4) break;
            len = ((size_t)data[pos + 2] << 8) | data[pos + 3];
            start = pos + 4;
        } else if (len == 127) {
            if (size - pos < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = (len << 8) | data[pos + 2 + i];
            start = pos + 10;
        }
        if (start + len > size) break;
        int op = data[pos] & 0x0F;
        const unsigned char *p = data + start;
        if (op == 1) {
            if (c->state == LIVE) {
                const unsigned char *m = memmem(p, len, "n=", 2);
                if (m != NULL) {
                    long v = strtol((const char *)m + 2, NULL, 10);
                    if (v >= 0 && v < MAX_MARK && ++counts[v] == n_clients)
                        printf("got %ld %.9f\n", v, now()), fflush(stdout);
                }
            } else if (memmem(p, len, "\"subscribed\"", 12) != NULL) {
                c->state = LIVE;
                ready_count++;
            }
        } else if (op == 9 && len < 126) {
            unsigned char pong[6 + 125];
            send_all(c->fd, pong, masked(pong, 0xA, p, len));
        }
        pos = start + len;
    }
    return pos;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: fanout_load N PORT SOURCE_ADDRESS\n");
        return 2;
    }
    n_clients = atoi(argv[1]);
    int port = atoi(argv[2]);
    const char *source = argv[3];
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev) < 0) die("epoll_ctl stdin");

    char request[512];
    int request_len = snprintf(request, sizeof request,
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n", port);
    const char *sub = "{\"type\":\"subscribe\",\"channels\":[\"bench_gateway\"]}";
    unsigned char subscribe[6 + 125];
    size_t subscribe_len = masked(subscribe, 1, (const unsigned char *)sub, strlen(sub));

    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &dst.sin_addr);
    struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = 0};
    if (inet_pton(AF_INET, source, &src.sin_addr) != 1) die("source address");

    Conn *conns = calloc(n_clients, sizeof(Conn));
    unsigned char *rbuf = malloc(READ_SIZE);
    struct epoll_event events[1024];
    int made = 0, lost = 0, announced = 0;
    double started = now();
    for (;;) {
        if (ready_count < n_clients) {
            if (now() - started > CONNECT_TIMEOUT) {
                fprintf(stderr, "fanout_load: only %d of %d subscribed in %.0f s\n",
                        ready_count, n_clients, CONNECT_TIMEOUT);
                return 1;
            }
            while (made < n_clients && made - ready_count - lost < IN_FLIGHT) {
                Conn *c = &conns[made++];
                c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
                if (c->fd < 0) die("socket");
                if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0) die("bind");
                if (connect(c->fd, (struct sockaddr *)&dst, sizeof dst) < 0 &&
                    errno != EINPROGRESS)
                    die("connect");
                c->state = CONNECTING;
                struct epoll_event e = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e) < 0) die("epoll_ctl");
            }
        }
        int n = epoll_wait(ep, events, 1024, 1000);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            Conn *c = events[i].data.ptr;
            if (c == NULL) { /* stdin: quit or end of file */
                char line[64];
                if (fgets(line, sizeof line, stdin) == NULL || strncmp(line, "quit", 4) == 0)
                    return 0;
                continue;
            }
            if (c->state == CONNECTING) {
                if (events[i].events & (EPOLLERR | EPOLLHUP)) die("connecting");
                send_all(c->fd, request, request_len);
                c->state = UPGRADING;
                struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                continue;
            }
            ssize_t got = recv(c->fd, rbuf, READ_SIZE, 0);
            if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (got <= 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                c->state = CLOSED;
                printf("lost %d\n", ++lost);
                fflush(stdout);
                continue;
            }
            unsigned char *data = rbuf;
            size_t size = (size_t)got;
            if (c->len) { /* a partial frame from the last read comes first */
                c->buf = realloc(c->buf, c->len + size);
                memcpy(c->buf + c->len, rbuf, size);
                data = (unsigned char *)c->buf;
                size += c->len;
            }
            size_t used = 0;
            if (c->state == UPGRADING) {
                unsigned char *end = memmem(data, size, "\r\n\r\n", 4);
                if (end == NULL) {
                    used = 0;
                    goto keep;
                }
                if (size < 12 || memcmp(data, "HTTP/1.1 101", 12) != 0) {
                    fprintf(stderr, "fanout_load: handshake refused: %.*s\n",
                            (int)(size < 200 ? size : 200), data);
                    return 1;
                }
                used = (size_t)(end - data) + 4;
                send_all(c->fd, subscribe, subscribe_len);
                c->state = SUBSCRIBING;
            }
            used += on_frames(c, data + used, size - used);
        keep:
            if (used < size) {
                size_t rest = size - used;
                if (data == rbuf) {
                    c->buf = realloc(c->buf, rest);
                    memcpy(c->buf, data + used, rest);
                } else {
                    memmove(c->buf, data + used, rest);
                }
                c->len = rest;
            } else {
                c->len = 0;
            }
            if (ready_count == n_clients && !announced) {
                printf("ready %.6f\n", now() - started);
                fflush(stdout);
                announced = 1;
            }
        }
    }
}
