#!/usr/bin/env python3
"""Statically quantizes an ONNX model to QDQ INT8 with onnxruntime.quantization,
calibrated on a folder of preprocessed input tensors (.npy), for the INT8
comparison in scripts/bench-int8.sh.

The model is first pre-processed with onnxruntime's quant_pre_process
(shape inference and graph optimisation, which folds BatchNormalization
into Conv), as onnxruntime recommends. Settings: QuantFormat.QDQ, per-channel INT8 weights, onnxruntime's default
activation type (QUInt8) and calibration method (MinMax) unless given.
"""
import argparse, glob, os

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                      QuantFormat, QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process


class Reader(CalibrationDataReader):
    def __init__(self, name, files):
        self.items = iter([{name: np.load(f).astype(np.float32)} for f in files])

    def get_next(self):
        return next(self.items, None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--onnx", required=True)
    p.add_argument("--npy", nargs="+", required=True, help="preprocessed input tensors")
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax")
    p.add_argument("--activations", choices=["u8", "s8"], default="u8")
    a = p.parse_args()
    model = onnx.load(a.onnx, load_external_data=False)
    name = model.graph.input[0].name
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[a.method]
    pre = a.out + ".pre.onnx"
    quant_pre_process(a.onnx, pre, skip_symbolic_shape=True)
    quantize_static(pre, a.out, Reader(name, sorted(a.npy)), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8 if a.activations == "u8" else QuantType.QInt8,
                    calibrate_method=method)


if __name__ == "__main__":
    main()
