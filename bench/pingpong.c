/* Load tool for bench/hbone.py: small-message RTT and idle connections.
 *
 * Written in C so the load generator is never what limits a measurement.
 *
 *   pingpong server IP PORT              epoll echo server, any number of connections
 *   pingpong client IP PORT COUNT SIZE   COUNT ping-pongs of SIZE bytes on one connection;
 *                                        prints one RTT in nanoseconds per line
 *   pingpong hold IP PORT N SIZE         opens N connections, one ping-pong each, prints
 *                                        "ready", keeps them open until stdin closes
 *   pingpong rate IP PORT CONNS RATE SECONDS SIZE
 *                                        RATE ping-pongs per second for SECONDS, round robin
 *                                        over CONNS kept-open connections; prints
 *                                        "done OK ERRORS ELAPSED_NS"
 *   pingpong churn IP PORT SECONDS RATE THREADS SIZE
 *                                        new connections for SECONDS, RATE per second in all
 *                                        (0: as fast as THREADS sequential clients go): each
 *                                        connects, sends SIZE bytes, half-closes, reads the
 *                                        echo to EOF, closes. Prints "done OK ERRORS
 *                                        ELAPSED_NS", then each connection's time in ns
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/time.h>
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

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void sleep_until(long deadline_ns) {
    long left = deadline_ns - now_ns();
    if (left > 0) {
        struct timespec t = {.tv_sec = left / 1000000000L, .tv_nsec = left % 1000000000L};
        nanosleep(&t, NULL);
    }
}

static void set_timeouts(int fd, int seconds) {
    struct timeval tv = {.tv_sec = seconds, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* One exchange; 0 on success. */
static int try_ping(int fd, char *buf, size_t size) {
    size_t done = 0;
    while (done < size) {
        ssize_t n = send(fd, buf + done, size - done, MSG_NOSIGNAL);
        if (n <= 0) return -1;
        done += (size_t)n;
    }
    done = 0;
    while (done < size) {
        ssize_t n = recv(fd, buf + done, size - done, 0);
        if (n <= 0) return -1;
        done += (size_t)n;
    }
    return 0;
}

static int rate(const char *ip, const char *port, int conns, double per_second, double seconds, size_t size) {
    struct sockaddr_in sa = address(ip, port);
    int *fds = calloc((size_t)conns, sizeof(int));
    char *buf = calloc(1, size);
    for (int i = 0; i < conns; i++) {
        fds[i] = dial(&sa);
        set_timeouts(fds[i], 5);
    }
    long ok = 0, errors = 0, start = now_ns(), total = (long)(per_second * seconds);
    for (long i = 0; i < total; i++) {
        sleep_until(start + (long)(i * 1e9 / per_second));
        int fd = fds[i % conns];
        if (fd < 0 || try_ping(fd, buf, size) != 0) {
            errors++;
            if (fd >= 0) close(fd);
            fds[i % conns] = -1;
        } else {
            ok++;
        }
    }
    printf("done %ld %ld %ld\n", ok, errors, now_ns() - start);
    for (int i = 0; i < conns; i++)
        if (fds[i] >= 0) close(fds[i]);
    return 0;
}

struct churn {
    struct sockaddr_in sa;
    size_t size;
    double per_second; /* 0: unpaced */
    long start, end;
    atomic_long next;   /* the next connection's number (pacing) */
    atomic_long ok, errors;
    long *times;        /* per connection, ns; -1 for a failure */
    long capacity;
};

/* 0 when the whole echo came back before EOF. */
static int one_connection(struct churn *c, char *buf) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    int one = 1, result = -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    set_timeouts(fd, 5);
    if (connect(fd, (struct sockaddr *)&c->sa, sizeof c->sa) == 0) {
        size_t sent = 0, got = 0;
        while (sent < c->size) {
            ssize_t n = send(fd, buf + sent, c->size - sent, MSG_NOSIGNAL);
            if (n <= 0) break;
            sent += (size_t)n;
        }
        if (sent == c->size && shutdown(fd, SHUT_WR) == 0) {
            ssize_t n;
            while ((n = recv(fd, buf, c->size, 0)) > 0) got += (size_t)n;
            if (n == 0 && got == c->size) result = 0;
        }
    }
    close(fd);
    return result;
}

static void *churn_worker(void *arg) {
    struct churn *c = arg;
    char *buf = calloc(1, c->size);
    for (;;) {
        long i = atomic_fetch_add(&c->next, 1);
        if (c->per_second > 0) {
            long due = c->start + (long)(i * 1e9 / c->per_second);
            if (due >= c->end) break;
            sleep_until(due);
        } else if (now_ns() >= c->end) {
            break;
        }
        long t = now_ns();
        int failed = one_connection(c, buf);
        t = now_ns() - t;
        if (failed) atomic_fetch_add(&c->errors, 1);
        else atomic_fetch_add(&c->ok, 1);
        if (i < c->capacity) c->times[i] = failed ? -1 : t;
    }
    free(buf);
    return NULL;
}

static int churn(const char *ip, const char *port, double seconds, double per_second, int threads, size_t size) {
    static struct churn c;
    c.sa = address(ip, port);
    c.size = size;
    c.per_second = per_second;
    c.capacity = 4000000;
    c.times = malloc((size_t)c.capacity * sizeof(long));
    for (long i = 0; i < c.capacity; i++) c.times[i] = -2; /* never started */
    c.start = now_ns();
    c.end = c.start + (long)(seconds * 1e9);
    pthread_t *tids = calloc((size_t)threads, sizeof(pthread_t));
    for (int i = 0; i < threads; i++) pthread_create(&tids[i], NULL, churn_worker, &c);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    long elapsed = now_ns() - c.start;
    printf("done %ld %ld %ld\n", atomic_load(&c.ok), atomic_load(&c.errors), elapsed);
    long started = atomic_load(&c.next);
    for (long i = 0; i < started && i < c.capacity; i++)
        if (c.times[i] >= 0) printf("%ld\n", c.times[i]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "server")) serve(argv[2], argv[3]);
    if (argc >= 6 && !strcmp(argv[1], "client")) return client(argv[2], argv[3], atol(argv[4]), (size_t)atol(argv[5]));
    if (argc >= 6 && !strcmp(argv[1], "hold")) return hold(argv[2], argv[3], atoi(argv[4]), (size_t)atol(argv[5]));
    if (argc >= 8 && !strcmp(argv[1], "rate"))
        return rate(argv[2], argv[3], atoi(argv[4]), atof(argv[5]), atof(argv[6]), (size_t)atol(argv[7]));
    if (argc >= 8 && !strcmp(argv[1], "churn"))
        return churn(argv[2], argv[3], atof(argv[4]), atof(argv[5]), atoi(argv[6]), (size_t)atol(argv[7]));
    fprintf(stderr, "usage: pingpong server IP PORT | client IP PORT COUNT SIZE | hold IP PORT N SIZE\n"
                    "       | rate IP PORT CONNS RATE SECONDS SIZE | churn IP PORT SECONDS RATE THREADS SIZE\n");
    return 2;
}
