// Reading and writing float32 .npy files (numpy's format 1.0/2.0, little-endian, C order): the
// example's tensor format, so Python can hand it a preprocessed batch and read the maps back.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

NpyArray read_npy_float32(const std::string& path);  // throws std::runtime_error naming the file
void write_npy_float32(const std::string& path, const float* data, const std::vector<int64_t>& shape);
