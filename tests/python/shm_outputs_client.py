#!/usr/bin/env python3
"""Outputs by shared memory from Python grpcio, against a running agent.

Run by tests/shm_outputs_test.ts. `--kind sysv` makes SysV segments with ctypes (shmget/shmat), `--kind
posix` POSIX objects with multiprocessing.shared_memory; the agent serves that kind. Every segment is
filled with a sentinel byte first, so the test can see exactly which bytes the agent wrote. Prints one
JSON object: per case, what the agent answered and what the segment holds afterwards.
"""

import argparse
import ctypes
import json
import os
import sys
from multiprocessing import shared_memory

import grpc
import numpy as np

IPC_PRIVATE = 0
IPC_CREAT = 0o1000
IPC_RMID = 0
IPC_SET = 1
IPC_STAT = 2
SHMID_DS_SIZE = 112
MODE_OFFSET = 20
SENTINEL = 0xAB
TIMEOUT_S = 60
U64_MAX = 2**64 - 1

libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]


class SysvSegment:
    def __init__(self, size, posix_prefix=None):
        self.size = size
        self.id = libc.shmget(IPC_PRIVATE, size, IPC_CREAT | 0o600)
        if self.id < 0:
            raise OSError(ctypes.get_errno(), "shmget")
        self.address = libc.shmat(self.id, None, 0)
        self.buf = memoryview((ctypes.c_ubyte * size).from_address(self.address)).cast("B")
        self.fill()

    def fill(self):
        self.buf[:] = bytes([SENTINEL]) * self.size

    def read_only(self):
        ds = ctypes.create_string_buffer(SHMID_DS_SIZE)
        if libc.shmctl(self.id, IPC_STAT, ds) != 0:
            raise OSError(ctypes.get_errno(), "IPC_STAT")
        ctypes.c_uint16.from_buffer(ds, MODE_OFFSET).value = 0o444
        if libc.shmctl(self.id, IPC_SET, ds) != 0:
            raise OSError(ctypes.get_errno(), "IPC_SET")

    def remove(self):
        if self.address is not None:
            self.buf.release()
            libc.shmdt(ctypes.c_void_p(self.address))
            self.address = None
            libc.shmctl(self.id, IPC_RMID, None)

    def bytes(self):
        return bytes(self.buf)




class PosixSegment:
    counter = 0

    def __init__(self, size, posix_prefix):
        PosixSegment.counter += 1
        self.id = 1000 + PosixSegment.counter
        # Python names POSIX objects without the leading slash.
        self.name = f"{posix_prefix.lstrip('/')}{self.id}"
        self.segment = shared_memory.SharedMemory(name=self.name, create=True, size=size)
        self.size = size
        self.buf = self.segment.buf[:size]
        self.fill()
        self.removed = False

    def fill(self):
        self.buf[:] = bytes([SENTINEL]) * self.size

    def read_only(self):
        os.chmod(f"/dev/shm/{self.name}", 0o444)

    def remove(self):
        if not self.removed:
            self.removed = True
            self.buf.release()
            self.segment.unlink()
            self.segment.close()

    def bytes(self):
        return bytes(self.buf)


def edge_manager(socket):
    """Edge Manager's generated client (stubs without output_locations): outputs come as bytes."""
    import agent_pb2 as pb
    import agent_pb2_grpc as rpc

    tensors = [
        pb.Tensor(
            tensor_metadata=pb.TensorMetadata(name=name.encode(), data_type=pb.FLOAT32, shape=[2, 2]),
            byte_data=np.array(values, "<f4").tobytes(),
        )
        for name, values in (("a", [[1, 2], [3, 4]]), ("b", [[10, 20], [30, 40]]))
    ]
    request = pb.PredictRequest(name="addsub", tensors=tensors)
    response = rpc.AgentStub(grpc.insecure_channel("unix:" + socket)).Predict(request, timeout=TIMEOUT_S)
    return {
        "has_output_locations": "output_locations" in pb.PredictRequest.DESCRIPTOR.fields_by_name,
        "request_hex": request.SerializeToString().hex(),
        "tensors": [
            {"name": t.tensor_metadata.name.decode(), "data": t.WhichOneof("data"), "hex": t.byte_data.hex()}
            for t in response.tensors
        ],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stubs", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--edge-manager", action="store_true", help="only Edge Manager's client (--stubs are its)")
    parser.add_argument("--kind", choices=["sysv", "posix"])
    parser.add_argument("--posix-prefix")
    parser.add_argument("--det-input", help="raw float32 file, shape [1,3,640,640]")
    args = parser.parse_args()
    sys.path.insert(0, args.stubs)
    if args.edge_manager:
        print(json.dumps(edge_manager(args.socket)))
        return
    import agent_pb2 as pb
    import agent_pb2_grpc as rpc

    stub = rpc.AgentStub(grpc.insecure_channel("unix:" + args.socket))
    Segment = SysvSegment if args.kind == "sysv" else PosixSegment
    segments = []

    def segment(size):
        s = Segment(size, args.posix_prefix)
        segments.append(s)
        return s

    def metadata(name, shape):
        return pb.TensorMetadata(name=name.encode(), data_type=pb.FLOAT32, shape=shape)

    def bytes_tensor(name, array):
        return pb.Tensor(tensor_metadata=metadata(name, list(array.shape)), byte_data=array.astype("<f4").tobytes())

    def shm_tensor(name, shape, seg, offset=0):
        return pb.Tensor(
            tensor_metadata=metadata(name, shape),
            shared_memory_handle=pb.SharedMemoryHandle(segment_id=seg.id, offset=offset, size=0),
        )

    def location(seg, offset, size, name="", index=0):
        return pb.OutputLocation(
            name=name, index=index, shared_memory_handle=pb.SharedMemoryHandle(segment_id=seg.id, offset=offset, size=size)
        )

    def call(model, tensors, locations=()):
        """The response's tensors, or the error's code and details."""
        try:
            response = stub.Predict(
                pb.PredictRequest(name=model, tensors=tensors, output_locations=list(locations)), timeout=TIMEOUT_S
            )
        except grpc.RpcError as error:
            return {"code": error.code().name, "details": error.details()}
        out = []
        for t in response.tensors:
            entry = {"name": t.tensor_metadata.name.decode(), "shape": list(t.tensor_metadata.shape), "data": t.WhichOneof("data")}
            if entry["data"] == "byte_data":
                entry["hex"] = t.byte_data.hex()
            elif entry["data"] == "shared_memory_handle":
                h = t.shared_memory_handle
                entry["handle"] = {"segment_id": h.segment_id, "offset": h.offset, "size": h.size}
            out.append(entry)
        return {"code": "OK", "tensors": out}

    def written(seg, offset, size):
        """What the segment holds: the region's bytes, and whether every byte outside it is untouched."""
        data = seg.bytes()
        outside = data[:offset] + data[offset + size :]
        return {"hex": data[offset : offset + size].hex(), "untouched_outside": outside == bytes([SENTINEL]) * len(outside)}

    def untouched(seg):
        return seg.bytes() == bytes([SENTINEL]) * seg.size

    results = {}
    try:
        # Inputs and outputs by shared memory against the bytes path: det (1.6 MB output of dynamic shape,
        # twice: the second time its shape is known before the Run), cls, addsub (fixed shape).
        det_input = np.fromfile(args.det_input, dtype="<f4").reshape(1, 3, 640, 640)
        det_bytes = call("det", [bytes_tensor("x", det_input)])
        det_in = segment(det_input.nbytes)
        det_in.buf[:] = det_input.tobytes()
        det_out_size = 640 * 640 * 4
        det_out = segment(64 + det_out_size + 64)
        rounds = []
        for _ in range(2):
            det_out.fill()
            answer = call("det", [shm_tensor("x", [1, 3, 640, 640], det_in)], [location(det_out, 64, det_out_size + 64)])
            rounds.append({"answer": answer, "segment": written(det_out, 64, det_out_size)})
        results["det"] = {"bytes": det_bytes, "shm": rounds, "segment_id": det_out.id}

        cls_input = np.linspace(-1, 1, 3 * 48 * 192, dtype="<f4").reshape(1, 3, 48, 192)
        cls_out = segment(8)
        results["cls"] = {
            "bytes": call("cls", [bytes_tensor("x", cls_input)]),
            "shm": call("cls", [bytes_tensor("x", cls_input)], [location(cls_out, 0, 0, index=0)]),
            "segment": written(cls_out, 0, 8),
        }

        a = np.array([[1, 2], [3, 4]], "<f4")
        b = np.array([[10, 20], [30, 40]], "<f4")
        ab = [bytes_tensor("a", a), bytes_tensor("b", b)]
        # One request: "sum" into shared memory (by name), "diff" as bytes.
        mixed = segment(64)
        results["mixed"] = {
            "answer": call("addsub", ab, [location(mixed, 16, 16, name="sum")]),
            "segment": written(mixed, 16, 16),
            "segment_id": mixed.id,
        }
        # Both outputs into one segment, by index, back to back.
        both = segment(32)
        results["both_outputs"] = {
            "answer": call("addsub", ab, [location(both, 16, 16, index=1), location(both, 0, 16, index=0)]),
            "segment": written(both, 0, 32),
        }

        # Too small: fixed shape (refused before the Run) and dynamic shape (checked after it).
        small = segment(64)
        results["too_small_fixed"] = {"answer": call("addsub", ab, [location(small, 0, 12, name="sum")]), "untouched": untouched(small)}
        results["too_small_end"] = {"answer": call("addsub", ab, [location(small, 56, 0, name="sum")]), "untouched": untouched(small)}
        small_dynamic = segment(4)
        results["too_small_dynamic"] = {
            "answer": call("cls", [bytes_tensor("x", cls_input)], [location(small_dynamic, 0, 0)]),
            "untouched": untouched(small_dynamic),
        }
        # A fitting output and a too small one in one request: nothing is written to either.
        fits = segment(16)
        results["too_small_with_other"] = {
            "answer": call("addsub", ab, [location(fits, 0, 16, name="sum"), location(small, 0, 8, name="diff")]),
            "untouched": untouched(fits) and untouched(small),
        }

        read_only = segment(16)
        read_only.read_only()
        results["read_only"] = {"answer": call("addsub", ab, [location(read_only, 0, 16)]), "untouched": untouched(read_only), "segment_id": read_only.id}

        # Write access taken away after a successful write (while the agent may keep a SysV segment attached).
        revoked = segment(16)
        granted = call("addsub", ab, [location(revoked, 0, 16)])
        revoked.read_only()
        revoked.fill()
        results["revoked"] = {
            "granted": granted,
            "denied": call("addsub", ab, [location(revoked, 0, 16)]),
            "untouched": untouched(revoked),
        }

        gone = segment(16)
        gone_id = gone.id
        gone.remove()
        results["gone"] = {"answer": call("addsub", ab, [location(gone, 0, 16)]), "segment_id": gone_id}

        wrap = segment(64)
        results["overflow"] = {
            "answers": [
                # offset + size wraps around 2^64 to 4 and to 0: both lie past the end.
                call("addsub", ab, [location(wrap, U64_MAX - 11, 16)]),
                call("addsub", ab, [location(wrap, 2**63, 2**63)]),
                call("addsub", ab, [location(wrap, 16, U64_MAX)]),
                call("addsub", ab, [location(wrap, 2**64 - 16, 0)]),
            ],
            "untouched": untouched(wrap),
        }
        results["unknown_output"] = call("addsub", ab, [location(wrap, 0, 16, name="product")])
        results["index_out_of_range"] = call("addsub", ab, [location(wrap, 0, 16, index=2)])
        results["twice"] = call("addsub", ab, [location(wrap, 0, 16, index=0), location(wrap, 16, 16, name="sum")])
        results["overlap"] = call("addsub", ab, [location(wrap, 0, 16, index=0), location(wrap, 8, 16, index=1)])
        results["misaligned"] = call("addsub", ab, [location(wrap, 2, 16)])
        results["overlap_untouched"] = untouched(wrap)

        # What Edge Manager's client sends for the same request, byte for byte.
        results["addsub_request_hex"] = pb.PredictRequest(name="addsub", tensors=ab).SerializeToString().hex()
    finally:
        for s in segments:
            s.remove()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
