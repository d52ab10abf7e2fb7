/* What a fork costs a process of a fork server's size, against an exec: N times fork, the
 * child touching one page and exiting, the parent waiting; CPU of both sides per fork.
 *
 *     cc -O2 -o /tmp/fork_cost benches/support/fork_cost.c && /tmp/fork_cost 4   # MiB touched
 *     perf stat -r 100 target/release/rip --version                               # an exec of rip
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double cpu_us(int who) {
    struct rusage r;
    getrusage(who, &r);
    return (r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1e6 + r.ru_utime.tv_usec + r.ru_stime.tv_usec;
}

int main(int argc, char **argv) {
    const int n = 200;
    size_t mib = argc > 1 ? (size_t)atoi(argv[1]) : 2;
    char *heap = malloc(mib << 20);
    if (!heap) return 1;
    memset(heap, 1, mib << 20);
    double self0 = cpu_us(RUSAGE_SELF), child0 = cpu_us(RUSAGE_CHILDREN);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) return 1;
        if (pid == 0) {
            heap[0] = 2;
            _exit(0);
        }
        waitpid(pid, NULL, 0);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double wall = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / 1e3 / n;
    printf("%zu MiB touched: %.1f us wall per fork, CPU %.1f us in the parent, %.1f us in the child\n", mib, wall,
           (cpu_us(RUSAGE_SELF) - self0) / n, (cpu_us(RUSAGE_CHILDREN) - child0) / n);
    return 0;
}
