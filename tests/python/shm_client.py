#!/usr/bin/env python3
"""Predict through shared memory from Python, as device applications do it.

Run by tests/python_client_test.ts against an agent serving SysV and POSIX shared memory ("both").
SysV: ctypes shmget/shmat (the Edge Manager example client's calls); POSIX:
multiprocessing.shared_memory. Prints one JSON object with the outputs of both requests.
"""

import argparse
import ctypes
import json
import sys
from multiprocessing import shared_memory

import grpc
import numpy as np

IPC_PRIVATE = 0
IPC_CREAT = 0o1000
IPC_RMID = 0
TIMEOUT_S = 30


def predict(stub, pb2, name, shape, segment_id):
    tensor = pb2.Tensor(
        tensor_metadata=pb2.TensorMetadata(name=b"x", data_type=pb2.FLOAT32, shape=shape),
        shared_memory_handle=pb2.SharedMemoryHandle(segment_id=segment_id, offset=0, size=0),
    )
    response = stub.Predict(pb2.PredictRequest(name=name, tensors=[tensor]), timeout=TIMEOUT_S)
    return np.frombuffer(response.tensors[0].byte_data, dtype="<f4").tolist()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stubs", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--posix-prefix", required=True, help="the agent's edge_agent_shm_posix_prefix")
    args = parser.parse_args()
    sys.path.insert(0, args.stubs)
    import agent_pb2 as pb2
    import agent_pb2_grpc as pb2_grpc

    stub = pb2_grpc.AgentStub(grpc.insecure_channel("unix:" + args.socket))
    shape = [2, 3]
    sysv_input = np.arange(6, dtype="<f4") * 1.5
    posix_input = np.arange(6, dtype="<f4") - 10

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    libc.shmdt.argtypes = [ctypes.c_void_p]
    shmid = libc.shmget(IPC_PRIVATE, sysv_input.nbytes, IPC_CREAT | 0o666)
    if shmid < 0:
        raise OSError(ctypes.get_errno(), "shmget")
    address = libc.shmat(shmid, None, 0)
    try:
        ctypes.memmove(address, sysv_input.tobytes(), sysv_input.nbytes)
        sysv_output = predict(stub, pb2, args.model, shape, shmid)
    finally:
        libc.shmdt(ctypes.c_void_p(address))
        libc.shmctl(shmid, IPC_RMID, None)

    segment_id = 7
    # Python names POSIX objects without the leading slash.
    segment = shared_memory.SharedMemory(
        name=f"{args.posix_prefix.lstrip('/')}{segment_id}", create=True, size=posix_input.nbytes
    )
    try:
        segment.buf[: posix_input.nbytes] = posix_input.tobytes()
        posix_output = predict(stub, pb2, args.model, shape, segment_id)
    finally:
        segment.close()
        segment.unlink()

    print(json.dumps({
        "sysv": {"input": sysv_input.tolist(), "output": sysv_output},
        "posix": {"input": posix_input.tolist(), "output": posix_output},
    }))


if __name__ == "__main__":
    main()
