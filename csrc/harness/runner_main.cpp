// balcony_cuda_harness CASE_DIR
//
// Runs one kernel entry under the CPU execution harness, once per seed. CASE_DIR/spec.txt, one item a line:
//   kernel NAME                  the entry (BALCONY_HARNESS_ENTRY) to run
//   seeds S1 S2 ...              scheduling seeds
//   param KEY VALUE              scalar parameter
//   buffer NAME in|out FILE      buffer with initial contents FILE (relative to CASE_DIR); `out` ones are
//                                written back after each seed as CASE_DIR/NAME.seedS.bin
// Every run gets fresh buffers, each its own heap block of exactly its size (so AddressSanitizer
// catches overruns). An entry's reports (Case::report: the launch choices it made) are printed after
// the first seed's run as "report KEY VALUE" lines. Exit status: 0 all seeds ran; 3 the harness found
// a bug or the launcher failed (message on stderr); 2 usage or input error. Sanitizer reports abort
// with their own status.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>

#include "runner.h"

namespace balcony_harness {
namespace {

std::map<std::string, Entry>& registry() {
  static std::map<std::string, Entry> r;
  return r;
}

[[noreturn]] void usage_error(const std::string& msg) {
  fprintf(stderr, "balcony_cuda_harness: %s\n", msg.c_str());
  exit(2);
}

std::vector<unsigned char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) usage_error("cannot read " + path);
  return std::vector<unsigned char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace

Registrar::Registrar(const char* name, Entry fn) { registry()[name] = fn; }

long long Case::i(const std::string& key) const { return std::stoll(str(key)); }
double Case::f(const std::string& key) const { return std::stod(str(key)); }
const std::string& Case::str(const std::string& key) const {
  auto it = params.find(key);
  if (it == params.end()) usage_error("missing parameter '" + key + "'");
  return it->second;
}
char* Case::scratch_raw(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) usage_error("out of memory");
  memset(p, 0xFF, bytes);
  scratch_blocks.push_back(p);
  return static_cast<char*>(p);
}
char* Case::raw(const std::string& name, bool optional) const {
  auto it = buffers.find(name);
  if (it == buffers.end()) {
    if (optional) return nullptr;
    usage_error("missing buffer '" + name + "'");
  }
  return it->second.data;
}

}  // namespace balcony_harness

int main(int argc, char** argv) {
  using namespace balcony_harness;
  if (argc != 2) usage_error("usage: balcony_cuda_harness CASE_DIR");
  const std::string dir = argv[1];
  std::ifstream spec(dir + "/spec.txt");
  if (!spec) usage_error("cannot read " + dir + "/spec.txt");
  Case c;
  std::string kernel;
  std::vector<unsigned long long> seeds;
  for (std::string line; std::getline(spec, line);) {
    std::istringstream ls(line);
    std::string what;
    if (!(ls >> what)) continue;
    if (what == "kernel") {
      ls >> kernel;
    } else if (what == "seeds") {
      for (unsigned long long s; ls >> s;) seeds.push_back(s);
    } else if (what == "param") {
      std::string k, v;
      ls >> k >> v;
      c.params[k] = v;
    } else if (what == "buffer") {
      std::string name, dirn, file;
      ls >> name >> dirn >> file;
      Buffer& b = c.buffers[name];
      b.initial = read_file(dir + "/" + file);
      b.output = dirn == "out";
    } else {
      usage_error("unknown spec line: " + line);
    }
  }
  auto it = registry().find(kernel);
  if (it == registry().end()) usage_error("no harness entry named '" + kernel + "'");
  if (seeds.empty()) seeds.push_back(0);
  for (unsigned long long seed : seeds) {
    for (auto& [name, b] : c.buffers) {
      void* p = nullptr;
      // 256-byte aligned like cudaMalloc; exactly the size asked for, so the redzone starts at the end.
      if (posix_memalign(&p, 256, b.initial.size() ? b.initial.size() : 1) != 0) usage_error("out of memory");
      if (!b.initial.empty()) memcpy(p, b.initial.data(), b.initial.size());
      b.data = static_cast<char*>(p);
    }
    set_seed(seed);
    c.reports.clear();
    const cudaError_t err = it->second(c);
    for (void* p : c.scratch_blocks) free(p);
    c.scratch_blocks.clear();
    if (failed() || err != cudaSuccess) {
      fprintf(stderr, "balcony_cuda_harness: %s failed with seed %llu: %s (%s)\n", kernel.c_str(), seed,
              failed() ? failure_message() : "the entry returned an error", cudaGetErrorString(err));
      return 3;
    }
    for (auto& [name, b] : c.buffers) {
      if (b.output) {
        std::ofstream out(dir + "/" + name + ".seed" + std::to_string(seed) + ".bin", std::ios::binary);
        out.write(b.data, std::streamsize(b.initial.size()));
      }
      free(b.data);
      b.data = nullptr;
    }
    if (seed == seeds.front())
      for (const auto& [key, value] : c.reports) printf("report %s %lld\n", key.c_str(), value);
    printf("ok %s seed %llu\n", kernel.c_str(), seed);
  }
  return 0;
}
