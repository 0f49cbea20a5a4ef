#include "npy.h"

#include <fstream>
#include <numeric>
#include <regex>
#include <sstream>
#include <stdexcept>

namespace {

std::runtime_error npy_error(const std::string& path, const std::string& what) {
  return std::runtime_error(path + ": " + what);
}

int64_t element_count(const std::vector<int64_t>& shape) {
  return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
}

}  // namespace

NpyArray read_npy_float32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw npy_error(path, "cannot open");
  char magic[8];
  if (!in.read(magic, 8) || std::string(magic, 6) != "\x93NUMPY") throw npy_error(path, "not a .npy file");
  uint32_t header_length = 0;
  unsigned char length_bytes[4] = {0, 0, 0, 0};
  const int length_size = magic[6] == 1 ? 2 : 4;  // format 1.0: uint16, 2.0 and later: uint32
  in.read(reinterpret_cast<char*>(length_bytes), length_size);
  for (int i = length_size - 1; i >= 0; --i) header_length = header_length << 8 | length_bytes[i];
  std::string header(header_length, '\0');
  if (!in.read(&header[0], header_length)) throw npy_error(path, "truncated header");

  if (header.find("'descr': '<f4'") == std::string::npos) throw npy_error(path, "expected float32 ('<f4') data");
  if (header.find("'fortran_order': False") == std::string::npos) throw npy_error(path, "expected C order");
  std::smatch match;
  if (!std::regex_search(header, match, std::regex("'shape': \\(([0-9, ]*)\\)"))) throw npy_error(path, "no shape");
  NpyArray array;
  std::stringstream dims(match[1].str());
  for (std::string dim; std::getline(dims, dim, ',');) {
    if (dim.find_first_not_of(' ') != std::string::npos) array.shape.push_back(std::stoll(dim));
  }
  array.data.resize(static_cast<size_t>(element_count(array.shape)));
  if (!in.read(reinterpret_cast<char*>(array.data.data()), array.data.size() * sizeof(float))) {
    throw npy_error(path, "truncated data");
  }
  return array;
}

void write_npy_float32(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  std::string dims;
  for (int64_t d : shape) dims += std::to_string(d) + ", ";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  header += std::string(63 - (10 + header.size()) % 64, ' ') + "\n";  // pad to a multiple of 64 bytes
  std::ofstream out(path, std::ios::binary);
  if (!out) throw npy_error(path, "cannot write");
  const char prefix[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  const uint16_t length = static_cast<uint16_t>(header.size());
  const char length_bytes[2] = {static_cast<char>(length & 0xff), static_cast<char>(length >> 8)};
  out.write(prefix, 8).write(length_bytes, 2).write(header.data(), header.size());
  out.write(reinterpret_cast<const char*>(data), element_count(shape) * sizeof(float));
  if (!out) throw npy_error(path, "write failed");
}
