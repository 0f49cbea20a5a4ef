// Explain a preprocessed image batch with an onnxcam-augmented model through the ONNX Runtime
// C++ API: the model computes its own Grad-CAM map; no onnxcam code runs here.
//
//   explain MODEL.cam.onnx BATCH.npy MAPS.npy [--class K | --class K1,K2,...]
//
// BATCH.npy: float32 [N, C, H, W], already preprocessed for the model (make_batch.py writes one).
// MAPS.npy:  float32 [N, H, W] in [0, 1], the map of each image. --class -1 (the default) explains
// each image's top class. One JSON line per image on stdout: the class explained and its score.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cstdint>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "npy.h"

namespace {

// The augmented-model contract (README): the run-time choices an augmented model takes; every
// one is fed on every run, -1 (or an all-zero mask) meaning "automatic".
const std::string kClassInput = "onnxcam_class";
const std::string kMaskInput = "onnxcam_mask";
bool is_automatic_int_input(const std::string& name) { return name == "onnxcam_box" || name == "onnxcam_step"; }
bool is_onnxcam_name(const std::string& name) { return name.rfind("onnxcam_", 0) == 0; }

std::vector<int64_t> parse_classes(const std::string& text, int64_t n) {
  std::vector<int64_t> classes;
  std::stringstream items(text);
  for (std::string item; std::getline(items, item, ',');) {
    size_t used = 0;
    const int64_t k = std::stoll(item, &used);
    if (used != item.size() || k < -1) throw std::invalid_argument("--class takes integers >= -1, got " + text);
    classes.push_back(k);
  }
  if (classes.size() == 1) return std::vector<int64_t>(n, classes[0]);
  if (static_cast<int64_t>(classes.size()) != n) {
    throw std::invalid_argument("--class lists " + std::to_string(classes.size()) + " classes for " +
                                std::to_string(n) + " images");
  }
  return classes;
}

// Every input the session takes by name: the graph inputs, then (models augmented before the
// contract made them inputs) overridable initializers, which only the C/C++ API accepts as feeds.
std::vector<std::string> feedable_names(const Ort::Session& session) {
  Ort::AllocatorWithDefaultOptions allocator;
  std::vector<std::string> names;
  for (size_t i = 0; i < session.GetInputCount(); ++i) names.emplace_back(session.GetInputNameAllocated(i, allocator).get());
  for (size_t i = 0; i < session.GetOverridableInitializerCount(); ++i) {
    std::string name = session.GetOverridableInitializerNameAllocated(i, allocator).get();
    if (is_onnxcam_name(name)) names.push_back(name);
  }
  return names;
}

// A class beyond the model's scores [N, K] is refused here, with the range, rather than by a
// Gather deep inside the graph.
void check_classes_in_range(const Ort::Session& session, const std::vector<int64_t>& classes) {
  Ort::AllocatorWithDefaultOptions allocator;
  for (size_t i = 0; i < session.GetOutputCount(); ++i) {
    const std::string name = session.GetOutputNameAllocated(i, allocator).get();
    const std::vector<int64_t> shape = session.GetOutputTypeInfo(i).GetTensorTypeAndShapeInfo().GetShape();
    if (is_onnxcam_name(name) || shape.size() != 2 || shape[1] <= 0) continue;
    for (int64_t k : classes) {
      if (k >= shape[1]) {
        throw std::invalid_argument("--class " + std::to_string(k) + " is out of range: " + name + " has classes 0.." +
                                    std::to_string(shape[1] - 1) + " (-1 = the top class)");
      }
    }
    return;
  }
}

int run(int argc, char** argv) {
  if (argc < 4) throw std::invalid_argument("usage: explain MODEL.cam.onnx BATCH.npy MAPS.npy [--class K[,K...]]");
  const std::string model_path = argv[1], batch_path = argv[2], maps_path = argv[3];
  std::string class_text = "-1";
  for (int i = 4; i < argc; ++i) {
    if (std::string(argv[i]) == "--class" && i + 1 < argc) class_text = argv[++i];
    else throw std::invalid_argument(std::string("unknown argument ") + argv[i]);
  }

  NpyArray batch = read_npy_float32(batch_path);
  if (batch.shape.size() != 4) throw std::invalid_argument(batch_path + ": expected a float32 [N, C, H, W] batch");
  const int64_t n = batch.shape[0], height = batch.shape[2], width = batch.shape[3];
  std::vector<int64_t> classes = parse_classes(class_text, n);

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "onnxcam-example");
  Ort::Session session(env, model_path.c_str(), Ort::SessionOptions{});
  Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  check_classes_in_range(session, classes);

  // The feeds: the image batch under the model's image input, and every onnxcam_* choice.
  std::vector<std::string> names;
  std::vector<Ort::Value> values;
  std::vector<int64_t> automatic(n, -1);
  std::vector<float> empty_mask(height * width, 0.0f);
  const std::vector<int64_t> class_shape{n}, mask_shape{1, height, width};
  const std::vector<std::string> feedable = feedable_names(session);
  if (std::count_if(feedable.begin(), feedable.end(), [](const std::string& s) { return !is_onnxcam_name(s); }) != 1) {
    throw std::invalid_argument(model_path + ": this example feeds models with one input besides the onnxcam_* ones");
  }
  for (const std::string& name : feedable) {
    if (!is_onnxcam_name(name)) {
      values.push_back(Ort::Value::CreateTensor<float>(memory, batch.data.data(), batch.data.size(), batch.shape.data(), 4));
    } else if (name == kClassInput) {
      values.push_back(Ort::Value::CreateTensor<int64_t>(memory, classes.data(), n, class_shape.data(), 1));
    } else if (is_automatic_int_input(name)) {
      values.push_back(Ort::Value::CreateTensor<int64_t>(memory, automatic.data(), n, class_shape.data(), 1));
    } else if (name == kMaskInput) {
      values.push_back(Ort::Value::CreateTensor<float>(memory, empty_mask.data(), empty_mask.size(), mask_shape.data(), 3));
    } else {
      throw std::invalid_argument(model_path + " takes " + name + "; this example explains classifiers and does not feed it");
    }
    names.push_back(name);
  }
  std::vector<const char*> input_names;
  for (const std::string& name : names) input_names.push_back(name.c_str());

  const char* output_names[] = {"onnxcam_cam", "onnxcam_class_index", "onnxcam_score"};
  std::vector<Ort::Value> outputs = session.Run(Ort::RunOptions{}, input_names.data(), values.data(), values.size(),
                                                output_names, 3);
  const std::vector<int64_t> cam_shape = outputs[0].GetTensorTypeAndShapeInfo().GetShape();  // [N, H, W]
  write_npy_float32(maps_path, outputs[0].GetTensorData<float>(), cam_shape);
  const int64_t* explained = outputs[1].GetTensorData<int64_t>();
  const float* scores = outputs[2].GetTensorData<float>();
  std::cout << std::setprecision(9);
  for (int64_t i = 0; i < n; ++i) {
    std::cout << "{\"image\": " << i << ", \"class_index\": " << explained[i] << ", \"score\": " << scores[i] << "}\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Ort::Exception& e) {
    std::cerr << "error: ONNX Runtime: " << e.what() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
  }
  return 2;
}
