// cli.h: helpers for tests that run the real ./fpdt (and mpirun) and read what it prints.
#pragma once
#include <ftw.h>
#include <sys/wait.h>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

struct Out {
    int rc;
    std::string out;  // stdout and stderr together
};

// Runs a shell command from the repo root; returns its exit code and output.
static inline Out run(const std::string& cmd) {
    Out r{-1, ""};
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    if (!p) return r;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
    int st = pclose(p);
    r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    return r;
}

// mpirun as CI runs it: as root, more ranks than cores.
static inline std::string mpirun(int np) {
    return "mpirun --allow-run-as-root --oversubscribe -np " + std::to_string(np) + " ";
}

// The same, one OpenMP thread per rank (the ranks share this machine's cores).
static inline std::string mpi(int np) { return mpirun(np) + "-x OMP_NUM_THREADS=1 "; }

// Shell that starts `cmd` (a run of many steps, e.g. two ranks under mpirun) in the background,
// its output in $out = d/log and its pid in $m, and waits, up to 60 s, until it has printed step 3.
static inline std::string start_past_step_3(const std::string& d, const std::string& cmd) {
    return "out=" + d + "/log; " + cmd + " > $out 2>&1 & m=$!; for i in $(seq 600); do grep -q 'step 3/' $out && break; "
           "sleep 0.1; done; ";
}
// Shell to follow start_past_step_3: stops (SIGSTOP) the last of $m's children, waits up to 60 s
// for the job to end on its own, and prints "rc=R secs=S" (R 0: it ended; 124: it did not) and
// the run's output.
static inline std::string stop_a_rank_and_wait() {
    return "s=$(pgrep -P $m | tail -1); kill -STOP $s; t0=$(date +%s); timeout 60 tail --pid=$m -f /dev/null; rc=$?; "
           "kill -9 $s $m 2>/dev/null; wait $m; echo \"rc=$rc secs=$(( $(date +%s) - t0 ))\"; cat $out";
}

// The losses of the "step N/M | loss X" lines, in order.
static inline std::vector<double> losses(const std::string& out) {
    std::vector<double> v;
    size_t p = 0;
    while ((p = out.find("| loss ", p)) != std::string::npos) {
        if (out.rfind("step ", p) != std::string::npos && out.compare(out.rfind('\n', p) + 1, 5, "step ") == 0)
            v.push_back(atof(out.c_str() + p + 7));
        p += 7;
    }
    return v;
}

// The lines that carry step losses, verbatim up to the loss (for exact comparisons).
static inline std::vector<std::string> loss_lines(const std::string& out) {
    std::vector<std::string> v;
    size_t a = 0;
    while (a < out.size()) {
        size_t b = out.find('\n', a);
        if (b == std::string::npos) b = out.size();
        std::string line = out.substr(a, b - a);
        if (line.rfind("step ", 0) == 0) v.push_back(line.substr(0, line.find(" | lr")));
        a = b + 1;
    }
    return v;
}

// The number after `key` in out (e.g. "peak device memory "), or -1.
static inline double number_after(const std::string& out, const std::string& key) {
    size_t p = out.find(key);
    return p == std::string::npos ? -1 : atof(out.c_str() + p + key.size());
}

static inline int count_lines(const std::string& s) {
    int n = 0;
    for (size_t a = 0; a < s.size();) {
        size_t b = s.find('\n', a);
        if (b == std::string::npos) b = s.size();
        if (b > a) n++;
        a = b + 1;
    }
    return n;
}

// A fresh directory under /tmp, removed with everything in it when the test program exits.
static inline std::string tmpdir() {
    static std::vector<std::string> made;
    static bool hooked = false;
    if (!hooked) {
        hooked = true;
        atexit([] {
            for (const std::string& d : made)  // no shell: a walk that removes depth first
                nftw(d.c_str(), [](const char* f, const struct stat*, int, struct FTW*) { return ::remove(f); }, 16,
                     FTW_DEPTH | FTW_PHYS);
        });
    }
    char t[] = "/tmp/fpdt_test_XXXXXX";
    if (!mkdtemp(t)) return "/tmp";
    made.push_back(t);
    return t;
}

// The operations of a --trace file (Chrome trace-event JSON as common.h's trace_write writes it:
// one event a line), in the file's order.
struct TraceOp {
    std::string name;
    int track, layer, chunk;
    double ts, dur;  // microseconds from the step's start
};
static inline std::vector<TraceOp> read_trace(const std::string& path) {
    std::vector<TraceOp> ops;
    std::ifstream f(path);
    for (std::string line; std::getline(f, line);) {
        if (line.find("\"ph\":\"X\"") == std::string::npos) continue;
        auto num = [&](const char* key) {
            const size_t p = line.find(key);
            return p == std::string::npos ? -1.0 : atof(line.c_str() + p + strlen(key));
        };
        const size_t n = line.find("\"name\":\"") + 8;
        ops.push_back({line.substr(n, line.find('"', n) - n), (int)num("\"tid\":"), (int)num("\"layer\":"),
                       (int)num("\"chunk\":"), num("\"ts\":"), num("\"dur\":")});
    }
    return ops;
}
