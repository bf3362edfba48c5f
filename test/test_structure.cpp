// The layering a reader takes bottom-up: every header of the project puts its #include lines at
// its top (before the first line of code), and the graph of the project's own includes has no
// cycle. Read from the sources themselves (the tests run in the repository root).
#include <gtest/gtest.h>
#include <dirent.h>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

static std::vector<std::string> project_sources() {
    std::vector<std::string> files;
    for (const char* dir : {".", "data"}) {
        DIR* d = opendir(dir);
        if (!d) continue;
        while (dirent* e = readdir(d)) {
            const std::string n = e->d_name;
            auto ends = [&](const char* s) { return n.size() > strlen(s) && n.compare(n.size() - strlen(s), strlen(s), s) == 0; };
            if (ends(".h") || ends(".cuh") || ends(".cu")) files.push_back(std::string(dir) == "." ? n : std::string(dir) + "/" + n);
        }
        closedir(d);
    }
    return files;
}

static std::string trim(const std::string& s) {
    size_t a = s.find_first_not_of(" \t"), b = s.find_last_not_of(" \t\r");
    return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// The quoted includes of a file, as paths from the repository root; *late is set to the first
// include that comes after a line of code (neither blank, a comment nor a preprocessor line).
static std::vector<std::string> own_includes(const std::string& path, std::string* late) {
    std::ifstream f(path);
    std::vector<std::string> inc;
    bool code_seen = false, in_comment = false;
    const std::string dir = path.find('/') == std::string::npos ? "" : path.substr(0, path.rfind('/') + 1);
    int n = 0;
    for (std::string line; std::getline(f, line);) {
        n++;
        std::string t = trim(line);
        if (in_comment) {
            if (t.find("*/") != std::string::npos) in_comment = false;
            continue;
        }
        if (t.rfind("/*", 0) == 0) {
            in_comment = t.find("*/") == std::string::npos;
            continue;
        }
        if (t.empty() || t.rfind("//", 0) == 0) continue;
        if (t.rfind("#include", 0) == 0) {
            if (code_seen && late->empty()) *late = path + ":" + std::to_string(n) + ": " + t;
            const size_t a = t.find('"');
            if (a == std::string::npos) continue;
            std::string name = t.substr(a + 1, t.find('"', a + 1) - a - 1);
            if (name.rfind("../", 0) == 0) name = name.substr(3);
            else if (!dir.empty() && name.find('/') == std::string::npos) name = dir + name;
            inc.push_back(name);
            continue;
        }
        if (t[0] != '#') code_seen = true;
    }
    return inc;
}

TEST(Structure, IncludesAtTheTopAndNoCycle) {
    std::map<std::string, std::vector<std::string>> graph;
    for (const std::string& f : project_sources()) {
        std::string late;
        graph[f] = own_includes(f, &late);
        EXPECT_TRUE(late.empty()) << "an #include below the file's first line of code: " << late;
    }
    ASSERT_GE(graph.size(), 10u) << "run the tests from the repository root";
    ASSERT_TRUE(graph.count("schedule.h") && graph.count("model.h"));
    // depth-first search; a file met again while still on the path closes a cycle
    std::map<std::string, int> state;  // 0 unseen, 1 on the path, 2 done
    std::vector<std::string> path;
    std::string cycle;
    std::function<void(const std::string&)> visit = [&](const std::string& f) {
        state[f] = 1, path.push_back(f);
        for (const std::string& g : graph[f]) {
            if (!cycle.empty()) break;
            if (state[g] == 1) {
                for (size_t i = 0; i < path.size(); i++)
                    if (path[i] == g) for (size_t j = i; j < path.size(); j++) cycle += path[j] + " -> ";
                cycle += g;
            } else if (state[g] == 0 && graph.count(g)) {
                visit(g);
            }
        }
        state[f] = 2, path.pop_back();
    };
    for (auto& kv : graph)
        if (state[kv.first] == 0 && cycle.empty()) visit(kv.first);
    EXPECT_TRUE(cycle.empty()) << "include cycle: " << cycle;
    // the arrows the layering promises: the model knows nothing of the sharding or the schedule
    for (const char* low : {"model.h", "checkpoint.h", "ulysses.h", "zero.h"})
        for (const std::string& g : graph[low]) EXPECT_NE(g, "schedule.h") << low << " includes the schedule";
    for (const std::string& g : graph["model.h"]) EXPECT_TRUE(g != "zero.h" && g != "ulysses.h") << "model.h includes " << g;
}
