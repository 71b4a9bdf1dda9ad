// Emulator stand-in for the CUDA header of this name (tests/cuda_emu/emu.h).
#pragma once
#include "../emu.h"
