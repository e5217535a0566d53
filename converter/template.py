"""The commented ``edgepack.toml`` template written by ``edgepack init``."""

TEMPLATE = '''\
# edgepack.toml: the reproducible recipe of a model bundle.
# Run `edgepack build -c edgepack.toml`. Any key can be overridden on the command line, e.g.
# `--budget 0.01`, `--variants onnx-fp32,onnx-int8`, or `--set evaluation.limit=500`.
# Paths are relative to this file; "pkg:module/sub/path" names a file inside an installed package.

[bundle]
name = "my-model"            # lower-case letters, digits, '.', '_', '-'
version = "0.1.0"            # semver; a version is immutable once signed
release_counter = 1          # must grow with every new version (devices refuse rollbacks)

[model]
path = "model.onnx"          # .onnx, .keras, or a TF SavedModel directory
# factory = "recipe.py:make_model"   # or a Python function returning a keras.Model, torch.nn.Module,
                                     # scikit-learn estimator or a path
format = "auto"              # auto | onnx | keras | savedmodel | torch | sklearn
opset = 17
# output_names = ["probs"]   # names of the model outputs (Keras / torch / sklearn inputs)
# [model.dynamic_axes]       # torch export: which axes are dynamic per input/output (default: batch)
# input_ids = [0, 1]

[task]
kind = "classification"      # classification | embedding | regression
# labels = ["cat", "dog"]    # class names in output order

# The preprocessing that ships in the bundle and runs on the device: raw input -> model features.
[preprocessing]
input = "image"              # image | tabular | text
output = "input"             # the model input name the last step feeds
steps = [
  { op = "scale", multiply = 0.00392156862745098 },   # 1/255
  { op = "cast", dtype = "float32" },
]
# [preprocessing.resources]
# "tokenizer.json" = "tokenizer.json"   # files ops need (tokenize)

# Representative inputs for static int8 calibration (~100-500 samples of training-like data).
[calibration]
path = "calibration.npz"     # .npz (raw_key array), .npy, .txt (one text a line), .jsonl
raw_key = "x"
limit = 200
# factory = "recipe.py:calibration_data"   # or a function returning (raw, labels)

# Held-out data every variant is scored on, against the fp32 original.
[evaluation]
path = "evaluation.npz"
raw_key = "x"
label_key = "y"              # omit labels and use metric = "agreement" (or "cosine") instead
metric = "accuracy"          # accuracy (top_k) | f1 | mae | cosine | agreement
top_k = 1
budget = 0.005               # largest loss allowed, in the metric's units (0.005 = 0.5 accuracy points)
golden_count = 8             # evaluation samples stored as golden vectors for the device self-test

[variants]
# onnx-fp32 | onnx-fp16 | onnx-int8 (static QDQ) | onnx-int8-dynamic (transformers)
# tflite-fp32 | tflite-fp16 | tflite-int8 (need a Keras or SavedModel input)
build = ["onnx-fp32", "onnx-int8"]

[variants.onnx-int8]
per_channel = "auto"         # auto builds both and keeps the one closer to fp32 on the calibration set
calibration_method = "minmax"   # minmax | entropy | percentile
# nodes_to_exclude = []      # leave nodes in fp32 (an op that cannot be quantized)

[targets]
profiles = ["rpi4", "rpi5", "x86-kiosk"]

# A user-defined profile (inherits from a built-in one):
# [profiles.jetson]
# base = "rpi5"
# runtimes = ["onnxruntime"]
# fp16_compute = true
# preference = ["onnx-fp16", "onnx-int8", "onnx-fp32"]

[signing]
keys = "keys"                # create with `edgepack keys init --out keys`
expires_days = 365

[output]
dir = "out"                  # bundle, build-report.json, build-report.md
latency_runs = 200             # timed calls per variant in all ...
latency_rounds = 10            # ... in interleaved rounds: every variant runs in every round
'''
