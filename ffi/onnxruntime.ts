// Raw bindings to ONNX Runtime's C API (onnxruntime_c_api.h) and thin classes that own its objects.
// No policy here: which options to set, when to run and when to release is decided in src/.

import { bindFunction, cString, keepAlive, NativeError, outPointer, readPointer, toPointer } from "./native.ts";

/** Slots we call are present in every runtime from 1.16 on (the table only grows at the end). */
export const ORT_API_VERSION = 16;

const apiBaseSymbols = {
  // const OrtApiBase* OrtGetApiBase(void)
  OrtGetApiBase: { parameters: [], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

/** OrtApiBase members, by byte offset. */
const apiBaseMembers = {
  // const OrtApi* GetApi(uint32_t version)
  GetApi: { offset: 0, parameters: ["u32"], result: "pointer" },
  // const char* GetVersionString(void)
  GetVersionString: { offset: 8, parameters: [], result: "pointer" },
} as const;

type SlotSymbol = Deno.ForeignFunction & { slot: number };

/** OrtApi function pointers: slot = index in the struct (see ort-api-slots.tsv). */
export const ortApiSymbols = {
  // OrtErrorCode GetErrorCode(const OrtStatus* status)
  GetErrorCode: { slot: 1, parameters: ["pointer"], result: "i32" },
  // const char* GetErrorMessage(const OrtStatus* status)
  GetErrorMessage: { slot: 2, parameters: ["pointer"], result: "pointer" },
  // OrtStatus* CreateEnv(OrtLoggingLevel log_severity_level, const char* logid, OrtEnv** out)
  CreateEnv: { slot: 3, parameters: ["i32", "buffer", "buffer"], result: "pointer" },
  // OrtStatus* CreateSessionFromArray(const OrtEnv* env, const void* model_data, size_t model_data_length,
  //                                   const OrtSessionOptions* options, OrtSession** out)
  CreateSessionFromArray: {
    slot: 8,
    parameters: ["pointer", "buffer", "usize", "pointer", "buffer"],
    result: "pointer",
    nonblocking: true,
  },
  // OrtStatus* Run(OrtSession* session, const OrtRunOptions* run_options, const char* const* input_names,
  //                const OrtValue* const* inputs, size_t input_len, const char* const* output_names,
  //                size_t output_names_len, OrtValue** outputs)
  Run: {
    slot: 9,
    parameters: ["pointer", "pointer", "buffer", "buffer", "usize", "buffer", "usize", "buffer"],
    result: "pointer",
    nonblocking: true,
  },
  // The same Run, on the calling thread: for Runs shorter than the hand-off to a worker thread and back.
  RunOnThisThread: {
    slot: 9,
    parameters: ["pointer", "pointer", "buffer", "buffer", "usize", "buffer", "usize", "buffer"],
    result: "pointer",
  },
  // OrtStatus* CreateSessionOptions(OrtSessionOptions** options)
  CreateSessionOptions: { slot: 10, parameters: ["buffer"], result: "pointer" },
  // OrtStatus* EnableCpuMemArena(OrtSessionOptions* options)
  EnableCpuMemArena: { slot: 18, parameters: ["pointer"], result: "pointer" },
  // OrtStatus* DisableCpuMemArena(OrtSessionOptions* options)
  DisableCpuMemArena: { slot: 19, parameters: ["pointer"], result: "pointer" },
  // OrtStatus* SetSessionGraphOptimizationLevel(OrtSessionOptions* options, GraphOptimizationLevel level)
  SetSessionGraphOptimizationLevel: { slot: 23, parameters: ["pointer", "i32"], result: "pointer" },
  // OrtStatus* SetIntraOpNumThreads(OrtSessionOptions* options, int intra_op_num_threads)
  SetIntraOpNumThreads: { slot: 24, parameters: ["pointer", "i32"], result: "pointer" },
  // OrtStatus* SetInterOpNumThreads(OrtSessionOptions* options, int inter_op_num_threads)
  SetInterOpNumThreads: { slot: 25, parameters: ["pointer", "i32"], result: "pointer" },
  // OrtStatus* SessionGetInputCount(const OrtSession* session, size_t* out)
  SessionGetInputCount: { slot: 30, parameters: ["pointer", "buffer"], result: "pointer" },
  // OrtStatus* SessionGetOutputCount(const OrtSession* session, size_t* out)
  SessionGetOutputCount: { slot: 31, parameters: ["pointer", "buffer"], result: "pointer" },
  // OrtStatus* SessionGetInputTypeInfo(const OrtSession* session, size_t index, OrtTypeInfo** type_info)
  SessionGetInputTypeInfo: { slot: 33, parameters: ["pointer", "usize", "buffer"], result: "pointer" },
  // OrtStatus* SessionGetOutputTypeInfo(const OrtSession* session, size_t index, OrtTypeInfo** type_info)
  SessionGetOutputTypeInfo: { slot: 34, parameters: ["pointer", "usize", "buffer"], result: "pointer" },
  // OrtStatus* SessionGetInputName(const OrtSession* session, size_t index, OrtAllocator* allocator, char** value)
  SessionGetInputName: {
    slot: 36,
    parameters: ["pointer", "usize", "pointer", "buffer"],
    result: "pointer",
  },
  // OrtStatus* SessionGetOutputName(const OrtSession* session, size_t index, OrtAllocator* allocator, char** value)
  SessionGetOutputName: {
    slot: 37,
    parameters: ["pointer", "usize", "pointer", "buffer"],
    result: "pointer",
  },
  // OrtStatus* CreateRunOptions(OrtRunOptions** out)
  CreateRunOptions: { slot: 39, parameters: ["buffer"], result: "pointer" },
  // OrtStatus* RunOptionsSetTerminate(OrtRunOptions* options)
  RunOptionsSetTerminate: { slot: 46, parameters: ["pointer"], result: "pointer" },
  // OrtStatus* CreateTensorWithDataAsOrtValue(const OrtMemoryInfo* info, void* p_data, size_t p_data_len,
  //     const int64_t* shape, size_t shape_len, ONNXTensorElementDataType type, OrtValue** out)
  CreateTensorWithDataAsOrtValue: {
    slot: 49,
    parameters: ["pointer", "pointer", "usize", "buffer", "usize", "i32", "buffer"],
    result: "pointer",
  },
  // OrtStatus* GetTensorMutableData(OrtValue* value, void** out)
  GetTensorMutableData: { slot: 51, parameters: ["pointer", "buffer"], result: "pointer" },
  // OrtStatus* CastTypeInfoToTensorInfo(const OrtTypeInfo* type_info, const OrtTensorTypeAndShapeInfo** out)
  CastTypeInfoToTensorInfo: { slot: 55, parameters: ["pointer", "buffer"], result: "pointer" },
  // OrtStatus* GetOnnxTypeFromTypeInfo(const OrtTypeInfo* type_info, enum ONNXType* out)
  GetOnnxTypeFromTypeInfo: { slot: 56, parameters: ["pointer", "buffer"], result: "pointer" },
  // OrtStatus* GetTensorElementType(const OrtTensorTypeAndShapeInfo* info, ONNXTensorElementDataType* out)
  GetTensorElementType: { slot: 60, parameters: ["pointer", "buffer"], result: "pointer" },
  // OrtStatus* GetDimensionsCount(const OrtTensorTypeAndShapeInfo* info, size_t* out)
  GetDimensionsCount: { slot: 61, parameters: ["pointer", "buffer"], result: "pointer" },
  // OrtStatus* GetDimensions(const OrtTensorTypeAndShapeInfo* info, int64_t* dim_values, size_t dim_values_length)
  GetDimensions: { slot: 62, parameters: ["pointer", "buffer", "usize"], result: "pointer" },
  // OrtStatus* GetTensorTypeAndShape(const OrtValue* value, OrtTensorTypeAndShapeInfo** out)
  GetTensorTypeAndShape: { slot: 65, parameters: ["pointer", "buffer"], result: "pointer" },
  // OrtStatus* GetValueType(const OrtValue* value, enum ONNXType* out)
  GetValueType: { slot: 67, parameters: ["pointer", "buffer"], result: "pointer" },
  // OrtStatus* CreateCpuMemoryInfo(enum OrtAllocatorType type, enum OrtMemType mem_type, OrtMemoryInfo** out)
  CreateCpuMemoryInfo: { slot: 69, parameters: ["i32", "i32", "buffer"], result: "pointer" },
  // OrtStatus* AllocatorFree(OrtAllocator* ort_allocator, void* p)
  AllocatorFree: { slot: 76, parameters: ["pointer", "pointer"], result: "pointer" },
  // OrtStatus* GetAllocatorWithDefaultOptions(OrtAllocator** out)
  GetAllocatorWithDefaultOptions: { slot: 78, parameters: ["buffer"], result: "pointer" },
  // void ReleaseEnv(OrtEnv* input)
  ReleaseEnv: { slot: 92, parameters: ["pointer"], result: "void" },
  // void ReleaseStatus(OrtStatus* input)
  ReleaseStatus: { slot: 93, parameters: ["pointer"], result: "void" },
  // void ReleaseMemoryInfo(OrtMemoryInfo* input)
  ReleaseMemoryInfo: { slot: 94, parameters: ["pointer"], result: "void" },
  // void ReleaseSession(OrtSession* input)
  ReleaseSession: { slot: 95, parameters: ["pointer"], result: "void" },
  // void ReleaseValue(OrtValue* input)
  ReleaseValue: { slot: 96, parameters: ["pointer"], result: "void" },
  // void ReleaseRunOptions(OrtRunOptions* input)
  ReleaseRunOptions: { slot: 97, parameters: ["pointer"], result: "void" },
  // void ReleaseTypeInfo(OrtTypeInfo* input)
  ReleaseTypeInfo: { slot: 98, parameters: ["pointer"], result: "void" },
  // void ReleaseTensorTypeAndShapeInfo(OrtTensorTypeAndShapeInfo* input)
  ReleaseTensorTypeAndShapeInfo: { slot: 99, parameters: ["pointer"], result: "void" },
  // void ReleaseSessionOptions(OrtSessionOptions* input)
  ReleaseSessionOptions: { slot: 100, parameters: ["pointer"], result: "void" },
  // OrtStatus* CreateEnvWithGlobalThreadPools(OrtLoggingLevel log_severity_level, const char* logid,
  //                                           const OrtThreadingOptions* tp_options, OrtEnv** out)
  CreateEnvWithGlobalThreadPools: { slot: 119, parameters: ["i32", "buffer", "pointer", "buffer"], result: "pointer" },
  // OrtStatus* DisablePerSessionThreads(OrtSessionOptions* options)
  DisablePerSessionThreads: { slot: 120, parameters: ["pointer"], result: "pointer" },
  // OrtStatus* CreateThreadingOptions(OrtThreadingOptions** out)
  CreateThreadingOptions: { slot: 121, parameters: ["buffer"], result: "pointer" },
  // void ReleaseThreadingOptions(OrtThreadingOptions* input)
  ReleaseThreadingOptions: { slot: 122, parameters: ["pointer"], result: "void" },
  // OrtStatus* AddSessionConfigEntry(OrtSessionOptions* options, const char* config_key, const char* config_value)
  AddSessionConfigEntry: { slot: 130, parameters: ["pointer", "buffer", "buffer"], result: "pointer" },
  // OrtStatus* SetGlobalIntraOpNumThreads(OrtThreadingOptions* tp_options, int intra_op_num_threads)
  SetGlobalIntraOpNumThreads: { slot: 147, parameters: ["pointer", "i32"], result: "pointer" },
  // OrtStatus* SetGlobalInterOpNumThreads(OrtThreadingOptions* tp_options, int inter_op_num_threads)
  SetGlobalInterOpNumThreads: { slot: 148, parameters: ["pointer", "i32"], result: "pointer" },
  // OrtStatus* SetGlobalSpinControl(OrtThreadingOptions* tp_options, int allow_spinning)
  SetGlobalSpinControl: { slot: 149, parameters: ["pointer", "i32"], result: "pointer" },
} as const satisfies Record<string, SlotSymbol>;

type OrtApiSymbols = typeof ortApiSymbols;
type BoundApi = {
  [K in keyof OrtApiSymbols]: Deno.UnsafeFnPointer<
    Omit<OrtApiSymbols[K], "slot">
  >["call"];
};

/** ONNXTensorElementDataType */
export const ElementType = {
  UNDEFINED: 0,
  FLOAT: 1,
  UINT8: 2,
  INT8: 3,
  UINT16: 4,
  INT16: 5,
  INT32: 6,
  INT64: 7,
  STRING: 8,
  BOOL: 9,
  FLOAT16: 10,
  DOUBLE: 11,
  UINT32: 12,
  UINT64: 13,
  COMPLEX64: 14,
  COMPLEX128: 15,
  BFLOAT16: 16,
} as const;

/** ONNXType: only tensors are served. */
export const ONNX_TYPE_TENSOR = 1;

/** GraphOptimizationLevel */
export const GraphOptimizationLevel = {
  disable: 0,
  basic: 1,
  extended: 2,
  layout: 3,
  all: 99,
} as const;

/** OrtErrorCode names, indexed by code. */
const ORT_ERROR_NAMES = [
  "OK",
  "FAIL",
  "INVALID_ARGUMENT",
  "NO_SUCHFILE",
  "NO_MODEL",
  "ENGINE_ERROR",
  "RUNTIME_EXCEPTION",
  "INVALID_PROTOBUF",
  "MODEL_LOADED",
  "NOT_IMPLEMENTED",
  "INVALID_GRAPH",
  "EP_FAIL",
  "MODEL_LOAD_CANCELED",
  "MODEL_REQUIRES_COMPILATION",
  "NOT_FOUND",
];

/** A non-null OrtStatus, carried as an exception with ORT's code and message. */
export class OrtError extends Error {
  constructor(readonly code: number, readonly ortMessage: string, readonly call: string) {
    super(`${call}: ${ORT_ERROR_NAMES[code] ?? `error ${code}`}: ${ortMessage}`);
    this.name = "OrtError";
  }
}

const ORT_LOGGING_LEVEL_WARNING = 2;
const ORT_LOGGING_LEVEL_ERROR = 3;
const ORT_ARENA_ALLOCATOR = 1;
const ORT_MEM_TYPE_DEFAULT = 0;

/** Thread pools the environment owns and every session that opts in (DisablePerSessionThreads) shares. */
export interface GlobalThreadPools {
  /** 0: one thread per core. */
  intraOpThreads: number;
  interOpThreads: number;
  allowSpinning: boolean;
}

/**
 * The loaded library, its API table, the process-wide OrtEnv, the default allocator and the CPU
 * memory info used to wrap caller-owned buffers. Close it last, after every session and value.
 */
export class OnnxRuntime {
  readonly version: string;
  readonly api: BoundApi;
  /** Created by the first session: the OrtEnv (ONNX's operator schemas) is most of ORT's memory before a model. */
  #env: Deno.PointerValue = null;
  #closed = false;
  readonly #verbose: boolean;
  readonly allocator: Deno.PointerValue;
  #cpuMemoryInfo: Deno.PointerValue;

  /** The environment's shared thread pools, or null when each session has its own. */
  readonly globalThreadPools: GlobalThreadPools | null;

  private constructor(
    lib: Deno.DynamicLibrary<typeof apiBaseSymbols>,
    verbose: boolean,
    pools: GlobalThreadPools | null,
  ) {
    const base = lib.symbols.OrtGetApiBase();
    if (base === null) throw new NativeError("OrtGetApiBase returned NULL");
    const member = <K extends keyof typeof apiBaseMembers>(name: K) => {
      const { offset, ...def } = apiBaseMembers[name];
      return bindFunction(readPointer(base, offset), def);
    };
    const versionPtr = member("GetVersionString").call();
    this.version = versionPtr ? Deno.UnsafePointerView.getCString(versionPtr) : "unknown";
    const table = member("GetApi").call(ORT_API_VERSION);
    if (table === null) {
      throw new NativeError(
        `ONNX Runtime ${this.version} does not offer API version ${ORT_API_VERSION} (1.${ORT_API_VERSION} or newer is needed)`,
      );
    }
    const api: Record<string, unknown> = {};
    for (const [name, { slot, ...def }] of Object.entries(ortApiSymbols)) {
      const fn = bindFunction(readPointer(table, slot * 8), def as Deno.ForeignFunction);
      api[name] = fn.call.bind(fn);
    }
    this.api = api as BoundApi;
    this.#verbose = verbose;
    this.globalThreadPools = pools;
    const allocator = outPointer();
    this.check("GetAllocatorWithDefaultOptions", this.api.GetAllocatorWithDefaultOptions(allocator));
    this.allocator = toPointer(allocator);
    const memoryInfo = outPointer();
    this.check(
      "CreateCpuMemoryInfo",
      this.api.CreateCpuMemoryInfo(ORT_ARENA_ALLOCATOR, ORT_MEM_TYPE_DEFAULT, memoryInfo),
    );
    this.#cpuMemoryInfo = toPointer(memoryInfo);
  }

  #createEnv(level: number, pools: GlobalThreadPools | null): Deno.PointerValue {
    const env = outPointer();
    if (pools === null) {
      this.check("CreateEnv", this.api.CreateEnv(level, cString("edge-agent"), env));
      return toPointer(env);
    }
    const out = outPointer();
    this.check("CreateThreadingOptions", this.api.CreateThreadingOptions(out));
    const threading = toPointer(out);
    try {
      this.check("SetGlobalIntraOpNumThreads", this.api.SetGlobalIntraOpNumThreads(threading, pools.intraOpThreads));
      this.check("SetGlobalInterOpNumThreads", this.api.SetGlobalInterOpNumThreads(threading, pools.interOpThreads));
      this.check("SetGlobalSpinControl", this.api.SetGlobalSpinControl(threading, pools.allowSpinning ? 1 : 0));
      this.check(
        "CreateEnvWithGlobalThreadPools",
        this.api.CreateEnvWithGlobalThreadPools(level, cString("edge-agent"), threading, env),
      );
      return toPointer(env);
    } finally {
      // The environment keeps what it needs from the options.
      this.api.ReleaseThreadingOptions(threading);
    }
  }

  /**
   * dlopen the library at `path` and create the environment, with thread pools shared by every
   * session when `globalThreadPools` is given.
   */
  static open(
    path: string,
    options: { verbose?: boolean; globalThreadPools?: GlobalThreadPools | null } = {},
  ): OnnxRuntime {
    const lib = Deno.dlopen(path, apiBaseSymbols);
    try {
      return new OnnxRuntime(lib, options.verbose ?? false, options.globalThreadPools ?? null);
    } catch (error) {
      lib.close();
      throw error;
    }
  }

  get env(): Deno.PointerValue {
    if (this.#closed) throw new NativeError("ONNX Runtime is closed");
    this.#env ??= this.#createEnv(
      this.#verbose ? ORT_LOGGING_LEVEL_WARNING : ORT_LOGGING_LEVEL_ERROR,
      this.globalThreadPools,
    );
    return this.#env;
  }

  get cpuMemoryInfo(): Deno.PointerValue {
    if (this.#cpuMemoryInfo === null) throw new NativeError("ONNX Runtime is closed");
    return this.#cpuMemoryInfo;
  }

  /** Turns a returned OrtStatus* into an OrtError (releasing the status). */
  check(call: string, status: Deno.PointerValue): void {
    if (status === null) return;
    const code = this.api.GetErrorCode(status);
    const messagePtr = this.api.GetErrorMessage(status);
    const message = messagePtr ? Deno.UnsafePointerView.getCString(messagePtr) : "";
    this.api.ReleaseStatus(status);
    throw new OrtError(code, message, call);
  }

  /** Copies then frees a string that ORT allocated with the default allocator. */
  takeString(ptr: Deno.PointerValue): string {
    if (ptr === null) return "";
    try {
      return Deno.UnsafePointerView.getCString(ptr);
    } finally {
      this.check("AllocatorFree", this.api.AllocatorFree(this.allocator, ptr));
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.api.ReleaseMemoryInfo(this.#cpuMemoryInfo);
    this.#cpuMemoryInfo = null;
    if (this.#env !== null) this.api.ReleaseEnv(this.#env);
    this.#env = null;
    // The library stays loaded: threads that ran ORT code (Deno's blocking pool runs every Run)
    // call ORT's thread_local destructors when they exit, which crashes once its code is unmapped.
  }
}

/** OrtSessionOptions, released once. */
export class SessionOptions {
  #ptr: Deno.PointerValue;
  constructor(readonly ort: OnnxRuntime) {
    const out = outPointer();
    ort.check("CreateSessionOptions", ort.api.CreateSessionOptions(out));
    this.#ptr = toPointer(out);
  }
  get pointer(): Deno.PointerValue {
    if (this.#ptr === null) throw new NativeError("session options used after release");
    return this.#ptr;
  }
  setIntraOpThreads(n: number): this {
    this.ort.check("SetIntraOpNumThreads", this.ort.api.SetIntraOpNumThreads(this.pointer, n));
    return this;
  }
  setInterOpThreads(n: number): this {
    this.ort.check("SetInterOpNumThreads", this.ort.api.SetInterOpNumThreads(this.pointer, n));
    return this;
  }
  /** Runs on the environment's global thread pools instead of pools of the session's own. */
  disablePerSessionThreads(): this {
    this.ort.check("DisablePerSessionThreads", this.ort.api.DisablePerSessionThreads(this.pointer));
    return this;
  }
  setGraphOptimizationLevel(level: number): this {
    this.ort.check(
      "SetSessionGraphOptimizationLevel",
      this.ort.api.SetSessionGraphOptimizationLevel(this.pointer, level),
    );
    return this;
  }
  setCpuMemArena(enabled: boolean): this {
    this.ort.check(
      enabled ? "EnableCpuMemArena" : "DisableCpuMemArena",
      enabled ? this.ort.api.EnableCpuMemArena(this.pointer) : this.ort.api.DisableCpuMemArena(this.pointer),
    );
    return this;
  }
  addConfigEntry(key: string, value: string): this {
    this.ort.check(
      "AddSessionConfigEntry",
      this.ort.api.AddSessionConfigEntry(this.pointer, cString(key), cString(value)),
    );
    return this;
  }
  release(): void {
    if (this.#ptr === null) return;
    this.ort.api.ReleaseSessionOptions(this.#ptr);
    this.#ptr = null;
  }
  [Symbol.dispose](): void {
    this.release();
  }
}

/**
 * OrtRunOptions for one Run: `terminate()` (from the JavaScript thread, while the Run is on a worker
 * thread) makes ORT stop the Run at its next node with an error status. Release only after the Run
 * returned: ORT reads the options until then.
 */
export class RunOptions {
  #ptr: Deno.PointerValue;
  constructor(readonly ort: OnnxRuntime) {
    const out = outPointer();
    ort.check("CreateRunOptions", ort.api.CreateRunOptions(out));
    this.#ptr = toPointer(out);
  }
  get pointer(): Deno.PointerValue {
    if (this.#ptr === null) throw new NativeError("run options used after release");
    return this.#ptr;
  }
  /** Asks the Run to stop; a no-op once released. */
  terminate(): void {
    if (this.#ptr === null) return;
    this.ort.check("RunOptionsSetTerminate", this.ort.api.RunOptionsSetTerminate(this.#ptr));
  }
  release(): void {
    if (this.#ptr === null) return;
    this.ort.api.ReleaseRunOptions(this.#ptr);
    this.#ptr = null;
  }
  [Symbol.dispose](): void {
    this.release();
  }
}

/** A tensor's element type and shape (dynamic dimensions are -1). */
export interface TensorInfo {
  name: string;
  /** ONNXTensorElementDataType, or -1 when the value is not a tensor. */
  elementType: number;
  shape: number[];
}

/** An OrtSession with the names and types of its inputs and outputs. */
export class Session {
  #ptr: Deno.PointerValue;
  readonly inputs: TensorInfo[];
  readonly outputs: TensorInfo[];
  readonly #inputNames: Uint8Array[];
  readonly #outputNamePointers: BigUint64Array;
  readonly #outputNames: Uint8Array[];

  private constructor(readonly ort: OnnxRuntime, ptr: Deno.PointerValue) {
    this.#ptr = ptr;
    const api = ort.api;
    this.inputs = this.#describe(api.SessionGetInputCount, api.SessionGetInputName, api.SessionGetInputTypeInfo);
    this.outputs = this.#describe(
      api.SessionGetOutputCount,
      api.SessionGetOutputName,
      api.SessionGetOutputTypeInfo,
    );
    this.#inputNames = this.inputs.map((t) => cString(t.name));
    this.#outputNames = this.outputs.map((t) => cString(t.name));
    this.#outputNamePointers = pointerArray(this.#outputNames);
  }

  /** Builds a session from model bytes, off the JavaScript thread. `model` may be freed after. */
  static async create(ort: OnnxRuntime, model: Uint8Array, options: SessionOptions): Promise<Session> {
    const out = outPointer();
    const status = await ort.api.CreateSessionFromArray(ort.env, model, BigInt(model.byteLength), options.pointer, out);
    ort.check("CreateSessionFromArray", status);
    const ptr = toPointer(out);
    try {
      return new Session(ort, ptr);
    } catch (error) {
      ort.api.ReleaseSession(ptr);
      throw error;
    }
  }

  #describe(
    count: (s: Deno.PointerValue, out: BigUint64Array) => Deno.PointerValue,
    getName: (s: Deno.PointerValue, i: bigint, a: Deno.PointerValue, out: BigUint64Array) => Deno.PointerValue,
    getTypeInfo: (s: Deno.PointerValue, i: bigint, out: BigUint64Array) => Deno.PointerValue,
  ): TensorInfo[] {
    const ort = this.ort;
    const n = new BigUint64Array(1);
    ort.check("SessionGet*Count", count(this.pointer, n));
    const result: TensorInfo[] = [];
    for (let i = 0n; i < n[0]; i++) {
      const namePtr = outPointer();
      ort.check("SessionGet*Name", getName(this.pointer, i, ort.allocator, namePtr));
      const name = ort.takeString(toPointer(namePtr));
      const typeInfoOut = outPointer();
      ort.check("SessionGet*TypeInfo", getTypeInfo(this.pointer, i, typeInfoOut));
      const typeInfo = toPointer(typeInfoOut);
      try {
        result.push({ name, ...readTypeInfo(ort, typeInfo) });
      } finally {
        ort.api.ReleaseTypeInfo(typeInfo);
      }
    }
    return result;
  }

  get pointer(): Deno.PointerValue {
    if (this.#ptr === null) throw new NativeError("session used after release");
    return this.#ptr;
  }

  /**
   * Runs the session off the JavaScript thread (on it when `onThisThread`). `inputs[i]` feeds the model input at
   * `inputIndexes[i]`; every model output is returned, in model order, owned by the caller.
   * `options` (its terminate flag) must stay unreleased until this returns. `preallocated[i]`, when
   * given, is a tensor of output i's exact shape for ORT to write that output into (Run's in/out
   * `outputs` array); it is returned in its place, still owned by whoever made it.
   */
  async run(
    inputIndexes: number[],
    inputs: Value[],
    options: RunOptions | null = null,
    preallocated: (Value | null)[] = [],
    onThisThread = false,
  ): Promise<Value[]> {
    const names = pointerArray(inputIndexes.map((i) => this.#inputNames[i]));
    const values = new BigUint64Array(inputs.map((v) => BigInt(Deno.UnsafePointer.value(v.pointer))));
    const outputs = new BigUint64Array(this.outputs.length);
    preallocated.forEach((value, i) => {
      if (value) outputs[i] = BigInt(Deno.UnsafePointer.value(value.pointer));
    });
    const args = [
      this.pointer,
      options?.pointer ?? null,
      names,
      values,
      BigInt(inputs.length),
      this.#outputNamePointers,
      BigInt(this.outputs.length),
      outputs,
    ] as const;
    const status = onThisThread ? this.ort.api.RunOnThisThread(...args) : await this.ort.api.Run(...args);
    keepAlive(names, values, inputs, options, preallocated);
    // ORT fills a preallocated OrtValue in place; should it ever hand back another one, that one is
    // returned (and owned by the caller) instead.
    const produced = Array.from(outputs, (p, i) => {
      const given = preallocated[i];
      if (given && BigInt(Deno.UnsafePointer.value(given.pointer)) === p) return given;
      return new Value(this.ort, Deno.UnsafePointer.create(p), null);
    });
    if (status !== null) {
      for (const [i, value] of produced.entries()) if (value !== preallocated[i]) value.release();
      this.ort.check("Run", status);
    }
    return produced;
  }

  release(): void {
    if (this.#ptr === null) return;
    this.ort.api.ReleaseSession(this.#ptr);
    this.#ptr = null;
  }
  [Symbol.dispose](): void {
    this.release();
  }
}

/**
 * An OrtValue. Tensors made from a caller's buffer keep that buffer referenced until release,
 * because ORT reads it in place.
 */
export class Value {
  #ptr: Deno.PointerValue;
  #backing: Uint8Array | null;

  constructor(readonly ort: OnnxRuntime, ptr: Deno.PointerValue, backing: Uint8Array | null) {
    this.#ptr = ptr;
    this.#backing = backing;
  }

  /**
   * Wraps `data` (not copied) as a tensor. `data` must not move or be freed before release. ORT may
   * write into it too: as a preallocated output of Session.run.
   */
  static tensorOver(ort: OnnxRuntime, data: Uint8Array, shape: number[], elementType: number): Value {
    const address = data.byteLength === 0 ? null : Deno.UnsafePointer.of(data);
    return new Value(ort, createTensor(ort, address, data.byteLength, shape, elementType), data);
  }

  /**
   * Wraps the `byteLength` bytes at `address` (not copied, and with no ArrayBuffer made over them) as a
   * tensor, e.g. in a shared memory mapping. They must stay mapped until release; ORT may write into them.
   */
  static tensorAt(
    ort: OnnxRuntime,
    address: Deno.PointerValue,
    byteLength: number,
    shape: number[],
    elementType: number,
  ): Value {
    if (address === null && byteLength > 0) throw new NativeError(`tensor of ${byteLength} bytes at no address`);
    return new Value(ort, createTensor(ort, byteLength === 0 ? null : address, byteLength, shape, elementType), null);
  }

  get pointer(): Deno.PointerValue {
    if (this.#ptr === null) throw new NativeError("value used after release");
    return this.#ptr;
  }

  /** Element type and shape of a tensor value. */
  tensorInfo(): { elementType: number; shape: number[] } {
    const ort = this.ort;
    const type = new Int32Array(1);
    ort.check("GetValueType", ort.api.GetValueType(this.pointer, type));
    if (type[0] !== ONNX_TYPE_TENSOR) return { elementType: -1, shape: [] };
    const out = outPointer();
    ort.check("GetTensorTypeAndShape", ort.api.GetTensorTypeAndShape(this.pointer, out));
    const info = toPointer(out);
    try {
      return readTensorShapeInfo(ort, info);
    } finally {
      ort.api.ReleaseTensorTypeAndShapeInfo(info);
    }
  }

  /** Address of the tensor's data (GetTensorMutableData). */
  dataAddress(): bigint {
    const out = outPointer();
    this.ort.check("GetTensorMutableData", this.ort.api.GetTensorMutableData(this.pointer, out));
    return out[0];
  }

  /**
   * The tensor's bytes as a view of ORT's memory (no copy). The view dies with this value:
   * read or copy it before release, never after.
   */
  borrowBytes(byteLength: number): Uint8Array {
    const out = outPointer();
    this.ort.check("GetTensorMutableData", this.ort.api.GetTensorMutableData(this.pointer, out));
    const data = toPointer(out);
    if (byteLength === 0 || data === null) return new Uint8Array(0);
    return new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(data, byteLength));
  }

  /** Copies a tensor's first `target.byteLength` bytes into `target` (no ArrayBuffer over ORT's memory). */
  copyBytesInto(target: Uint8Array): void {
    if (target.byteLength === 0) return;
    const out = outPointer();
    this.ort.check("GetTensorMutableData", this.ort.api.GetTensorMutableData(this.pointer, out));
    const data = toPointer(out);
    if (data === null) throw new NativeError("tensor has no data");
    new Deno.UnsafePointerView(data).copyInto(target);
  }

  release(): void {
    if (this.#ptr === null) return;
    this.ort.api.ReleaseValue(this.#ptr);
    this.#ptr = null;
    this.#backing = null;
  }
  [Symbol.dispose](): void {
    this.release();
  }
}

/** ORT wants a non-null data pointer even for tensors with zero elements. */
const EMPTY_TENSOR_BUFFER = new BigUint64Array(1);

/** CreateTensorWithDataAsOrtValue over `byteLength` bytes at `address` (null: an empty tensor). */
function createTensor(
  ort: OnnxRuntime,
  address: Deno.PointerValue,
  byteLength: number,
  shape: number[],
  elementType: number,
): Deno.PointerValue {
  const dims = new BigInt64Array(shape.map(BigInt));
  const out = outPointer();
  ort.check(
    "CreateTensorWithDataAsOrtValue",
    ort.api.CreateTensorWithDataAsOrtValue(
      ort.cpuMemoryInfo,
      address ?? Deno.UnsafePointer.of(EMPTY_TENSOR_BUFFER),
      BigInt(byteLength),
      dims,
      BigInt(shape.length),
      elementType,
      out,
    ),
  );
  return toPointer(out);
}

function readTypeInfo(ort: OnnxRuntime, typeInfo: Deno.PointerValue): Omit<TensorInfo, "name"> {
  const onnxType = new Int32Array(1);
  ort.check("GetOnnxTypeFromTypeInfo", ort.api.GetOnnxTypeFromTypeInfo(typeInfo, onnxType));
  if (onnxType[0] !== ONNX_TYPE_TENSOR) return { elementType: -1, shape: [] };
  const out = outPointer();
  ort.check("CastTypeInfoToTensorInfo", ort.api.CastTypeInfoToTensorInfo(typeInfo, out));
  // Borrowed from typeInfo: valid until the caller releases it.
  return readTensorShapeInfo(ort, toPointer(out));
}

function readTensorShapeInfo(
  ort: OnnxRuntime,
  info: Deno.PointerValue,
): { elementType: number; shape: number[] } {
  const elementType = new Int32Array(1);
  ort.check("GetTensorElementType", ort.api.GetTensorElementType(info, elementType));
  const count = new BigUint64Array(1);
  ort.check("GetDimensionsCount", ort.api.GetDimensionsCount(info, count));
  const dims = new BigInt64Array(Number(count[0]));
  ort.check("GetDimensions", ort.api.GetDimensions(info, dims, count[0]));
  return { elementType: elementType[0], shape: Array.from(dims, Number) };
}

function pointerArray(buffers: Uint8Array[]): BigUint64Array {
  return new BigUint64Array(buffers.map((b) => BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(b)))));
}
