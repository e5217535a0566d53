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
                                     # scikit-learn estimator (exported with skl2onnx) or a path
format = "auto"              # auto | onnx | keras | savedmodel | torch | sklearn
opset = 17
# output_names = ["probs"]   # names of the model outputs (Keras / torch inputs)
# [model.dynamic_axes]       # torch export: which axes are dynamic per input/output (default: batch)
# input_ids = [0, 1]

[task]
kind = "classification"      # classification | embedding | regression
# labels = ["cat", "dog"]    # class names in output order (as many as the model has classes)

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

# Training data the preprocessing learns from: needed only when a step learns its parameters
# (impute, standard_scale, one_hot). Never the evaluation set. The build report says what was fitted.
# [fit]
# path = "train.npz"         # .npz (raw_key array), .npy, .txt, .jsonl; or factory = "recipe.py:train_data"
# raw_key = "x"

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
# output = "probabilities"   # which model output the metric reads; needed only when it is ambiguous (by
                             # default: the only output, or for classification the only 2-D float one,
                             # e.g. skl2onnx's "probabilities" next to "label")
# name = "held-out 2026-05"  # how the report names this evaluation set
# class_budget = 0.05        # classifiers: largest loss of any single class (default 0.05; false = off)
# min_cosine = 0.98          # embeddings: worst sample's cosine to fp32 (default 1 - 2 * budget)
# nn_agreement = 0.9         # embeddings: share keeping their nearest neighbour (default 0.9)
# p5_cosine = 0.99           # embeddings: 5th-percentile cosine (off by default)
golden_count = 8             # evaluation samples stored as golden vectors for the device self-test

# Optional training stages (Keras or PyTorch models). Their variants are the usual ids with a prefix:
# "pruned-onnx-int8", "student-tflite-int8", ... and are gated against the fp32 original like any other.
# [prune]                    # magnitude pruning (unstructured), fine-tuned on the data
# data = { factory = "recipe.py:training" }   # raw samples (+ labels when present)
# sparsity = 0.5
# epochs = 5
# learning_rate = 0.001
# [distill]                  # a smaller student trained on the teacher's outputs (no labels needed)
# data = { path = "unlabeled.npz" }
# width = 0.5                # Keras: channels/units of every layer but the output, times this
# keep_layers = [0, 2, 4]    # PyTorch: entries of the model's largest layer list to keep
# student = "recipe.py:student"   # or a function taking the teacher and returning the student
# epochs = 20
# budget = 0.01              # the student's own gate (reported; ships only within [evaluation] budget)

[variants]
# onnx-fp32 | onnx-fp16 | onnx-int8 (static QDQ) | onnx-int8-dynamic (transformers)
# tflite-fp32 | tflite-fp16 | tflite-int8 (need a Keras or SavedModel input)
# each optionally prefixed pruned- or student- (needs [prune] / [distill])
build = ["onnx-fp32", "onnx-int8"]

[variants.onnx-int8]
per_channel = "auto"         # auto builds both and keeps the one closer to fp32 on the calibration set
calibration_method = "minmax"   # minmax | entropy | percentile
# nodes_to_exclude = []      # leave nodes in fp32 (an op that cannot be quantized)

# [variants.onnx-int8-dynamic]
# per_channel = true
# weight_only_nodes = "auto" # sensitive MatMuls: 8-bit weights, fp32 activations, until the gates pass
# min_smaller_x = 3.5        # ... while the model stays this much smaller than fp32

[targets]
profiles = ["rpi4", "rpi5", "x86-kiosk"]

# A user-defined profile (inherits from a built-in one):
# [profiles.jetson]
# base = "rpi5"
# runtimes = ["onnxruntime"]
# fp16_compute = true
# preference = ["onnx-fp16", "onnx-int8", "onnx-fp32"]

[signing]
keys = "keys"                # key directory, relative to this file (`edgepack keys init --out DIR`; --keys DIR)
expires_days = 365

[output]
dir = "out"                  # bundle, build-report.json, build-report.md
latency_runs = 200             # timed calls per variant in all ...
latency_rounds = 10            # ... in interleaved rounds: every variant runs in every round
'''
