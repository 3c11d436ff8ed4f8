// How far apart the two CPUs a pass runs on are: the round trip of a flag between two threads, one
// pinned to each (ns). On the project's 2-vCPU VMs it reads ~45-70 ns when the host places both on
// one core complex (a shared L3) and ~400 ns when it places them on two, and the placement changes
// minute to minute: two memory paths then speed a 1-row AR step ~20% while the few-row passes,
// which hand more data between the threads, gain little (BENCHMARKS.md, "Two placements").
// `machine_states.py` builds and loads it (gcc -O2 -shared -fPIC -pthread).
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

static _Atomic long flag;
static long trips;

static void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void* answer(void* cpu) {
  pin((int)(long)cpu);
  for (long i = 0; i < trips; ++i) {
    while (atomic_load_explicit(&flag, memory_order_acquire) != 2 * i + 1) __builtin_ia32_pause();
    atomic_store_explicit(&flag, 2 * i + 2, memory_order_release);
  }
  return 0;
}

// Mean ns of `rounds` round trips between CPUs a and b (the caller's thread keeps its affinity).
double handoff_ns(long rounds, int a, int b) {
  cpu_set_t before;
  pthread_getaffinity_np(pthread_self(), sizeof before, &before);
  pthread_t other;
  trips = rounds;
  atomic_store(&flag, 0);
  pthread_create(&other, 0, answer, (void*)(long)b);
  pin(a);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long i = 0; i < rounds; ++i) {
    atomic_store_explicit(&flag, 2 * i + 1, memory_order_release);
    while (atomic_load_explicit(&flag, memory_order_acquire) != 2 * i + 2) __builtin_ia32_pause();
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  pthread_join(other, 0);
  pthread_setaffinity_np(pthread_self(), sizeof before, &before);
  return ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / rounds;
}
