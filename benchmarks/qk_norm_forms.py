"""The weightless QK norm on ONNX Runtime's CPU provider in three forms: the six nodes torch exports
(Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul), RMSNormalization (opset 23) and com.microsoft
SimplifiedLayerNormalization, each 24 times in a chain over [1, 1, 8, 64] (a decode step's q at h512),
2 threads, ORT graph optimizations on. Prints the max difference to the six-node form and us per norm
(the session call's own overhead spread over the 24). Figures: passes/fusions/qk_norm.py. Not a test.

    python benchmarks/qk_norm_forms.py
"""

import time

import numpy as np
import onnxruntime as ort
from onnx import helper as h, TensorProto as T, numpy_helper as nh
D=64
def mk(kind, n=24):
    nodes=[]; inits=[nh.from_array(np.ones(D,np.float32),"ones"), nh.from_array(np.array(2.0,np.float32),"two"),
        nh.from_array(np.array([-1],np.int64),"ax"), nh.from_array(np.array(1e-5,np.float32),"eps")]
    x="x"
    for i in range(n):
        y=f"y{i}"
        if kind=="chain":
            nodes += [h.make_node("Pow",[x,"two"],[f"p{i}"]), h.make_node("ReduceMean",[f"p{i}","ax"],[f"m{i}"],keepdims=1),
                      h.make_node("Add",[f"m{i}","eps"],[f"a{i}"]), h.make_node("Sqrt",[f"a{i}"],[f"s{i}"]),
                      h.make_node("Reciprocal",[f"s{i}"],[f"r{i}"]), h.make_node("Mul",[x,f"r{i}"],[y])]
        elif kind=="rms":
            nodes.append(h.make_node("RMSNormalization",[x,"ones"],[y],axis=-1,epsilon=1e-5,stash_type=1))
        else:
            nodes.append(h.make_node("SimplifiedLayerNormalization",[x,"ones"],[y],axis=-1,epsilon=1e-5,stash_type=1))
        x=y
    g=h.make_graph(nodes,"g",[h.make_tensor_value_info("x",T.FLOAT,[1,1,8,D])],[h.make_tensor_value_info(x,T.FLOAT,None)],inits)
    m=h.make_model(g,opset_imports=[h.make_opsetid("",23)])
    so=ort.SessionOptions(); so.intra_op_num_threads=2; so.log_severity_level=3
    return ort.InferenceSession(m.SerializeToString(),so,providers=["CPUExecutionProvider"])
x=np.random.default_rng(0).standard_normal((1,1,8,D)).astype(np.float32)
ss={k:mk(k) for k in ["chain","rms","sln"]}
ref=ss["chain"].run(None,{"x":x})[0]
for k,s in ss.items():
    print(k, np.abs(s.run(None,{"x":x})[0]-ref).max())
for rep in range(3):
    for k,s in ss.items():
        t=time.perf_counter()
        for _ in range(2000): s.run(None,{"x":x})
        print(rep,k, f"{(time.perf_counter()-t)/2000/24*1e6:.2f} us per norm")
