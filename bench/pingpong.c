/* Load tool for bench/hbone.py: small-message RTT and idle connections.
 *
 * Written in C so the load generator is never what limits a measurement.
 *
 *   pingpong server IP PORT              epoll echo server, any number of connections
 *   pingpong client IP PORT COUNT SIZE   COUNT ping-pongs of SIZE bytes on one connection;
 *                                        prints one RTT in nanoseconds per line
 *   pingpong hold IP PORT N SIZE         opens N connections, one ping-pong each, prints
 *                                        "ready", keeps them open until stdin closes
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
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(1);
}

static struct sockaddr_in address(const char *ip, const char *port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)atoi(port));
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) die("inet_pton");
    return sa;
}

static int dial(struct sockaddr_in *sa) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)sa, sizeof *sa) < 0) die("connect");
    return fd;
}

static void ping(int fd, char *buf, size_t size) {
    size_t done = 0;
    while (done < size) {
        ssize_t n = send(fd, buf + done, size - done, 0);
        if (n <= 0) die("send");
        done += (size_t)n;
    }
    done = 0;
    while (done < size) {
        ssize_t n = recv(fd, buf + done, size - done, 0);
        if (n <= 0) die("recv");
        done += (size_t)n;
    }
}

static __attribute__((noreturn)) void serve(const char *ip, const char *port) {
    struct sockaddr_in sa = address(ip, port);
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(listener, 4096) < 0) die("listen");
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener};
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
    static char buf[65536];
    struct epoll_event events[256];
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                int c;
                while ((c = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t got = recv(fd, buf, sizeof buf, 0);
            if (got <= 0) {
                if (got < 0 && errno == EAGAIN) continue;
                close(fd);
                continue;
            }
            ssize_t done = 0;
            while (done < got) { /* echo replies are small: blocking briefly is fine */
                ssize_t w = send(fd, buf + done, (size_t)(got - done), 0);
                if (w < 0) {
                    if (errno == EAGAIN) continue;
                    break;
                }
                done += w;
            }
        }
    }
}

static int client(const char *ip, const char *port, long count, size_t size) {
    struct sockaddr_in sa = address(ip, port);
    int fd = dial(&sa);
    char *buf = calloc(1, size);
    long *rtts = calloc((size_t)count, sizeof(long));
    for (long i = 0; i < count; i++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        ping(fd, buf, size);
        clock_gettime(CLOCK_MONOTONIC, &b);
        rtts[i] = (b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec);
    }
    for (long i = 0; i < count; i++) printf("%ld\n", rtts[i]);
    close(fd);
    return 0;
}

static int hold(const char *ip, const char *port, int count, size_t size) {
    struct sockaddr_in sa = address(ip, port);
    int *fds = calloc((size_t)count, sizeof(int));
    char *buf = calloc(1, size);
    for (int i = 0; i < count; i++) {
        fds[i] = dial(&sa);
        ping(fds[i], buf, size);
    }
    printf("ready\n");
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0) {
    }
    for (int i = 0; i < count; i++) close(fds[i]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "server")) serve(argv[2], argv[3]);
    if (argc >= 6 && !strcmp(argv[1], "client")) return client(argv[2], argv[3], atol(argv[4]), (size_t)atol(argv[5]));
    if (argc >= 6 && !strcmp(argv[1], "hold")) return hold(argv[2], argv[3], atoi(argv[4]), (size_t)atol(argv[5]));
    fprintf(stderr, "usage: pingpong server IP PORT | client IP PORT COUNT SIZE | hold IP PORT N SIZE\n");
    return 2;
}
