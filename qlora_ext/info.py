"""`python -m qlora_ext.info`: how the extension was built and what this machine offers it."""
import torch

import qlora_ext


def main() -> None:
    info = qlora_ext.build_info()
    print(f"qlora_ext {qlora_ext.__version__}")
    print(f"  built against torch {info['torch_version']}; running torch {torch.__version__}")
    if info["cuda"]:
        rt = info["cuda_runtime_version"]
        print(f"  CUDA kernels: yes (CUDA {rt // 1000}.{rt % 1000 // 10}, archs {info['cuda_arch_list']})")
    else:
        print("  CUDA kernels: no (CPU-only build)")
    print(f"  CPU SIMD paths: AVX2 {'on' if info['cpu_simd'] else 'off'}, "
          f"AVX-512 {'on' if info['cpu_avx512'] else 'off'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            ok = "ok" if (p.major, p.minor) >= (8, 0) else "too old (needs 8.0+)"
            large = f"; fused large-M kernels: {qlora_ext.fused_large_kernel(i)}" if info["cuda"] and ok == "ok" else ""
            print(f"  GPU {i}: {p.name}, sm_{p.major}{p.minor} ({ok}{large})")
            entry = qlora_ext.auto_routing().get(qlora_ext.routing.gpu_key(p.major, p.minor))
            routed = qlora_ext.routing.describe(entry) if entry else "none measured for this GPU: dequantize + cuBLAS"
            print(f"    linear_4bit 'auto' routing: {routed}")
    else:
        print("  GPU: none visible")
    measured = qlora_ext.auto_routing()
    print("  linear_4bit 'auto' routing table: " + (", ".join(sorted(measured)) + " measured" if measured else
                                                    "no GPU measured: dequantize + cuBLAS everywhere"))


if __name__ == "__main__":
    main()
