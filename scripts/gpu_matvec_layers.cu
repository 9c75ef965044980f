// Stand-alone harness: the five decode mat-vecs of each of a 13B's 40 layers (Q4_K q/k,
// Q6_K v, Q4_K output, Q4_K gate/up, Q6_K down; 8.14 GB of random weights, so L2 serves none
// of it), launched back to back as flea launches them (128-thread blocks, one warp per row,
// programmatic dependent launch, weights prefetched before the wait), from a stream and as a
// CUDA graph; also with a plain read of the same bytes in the same grids, and variants (`tma`:
// each block's Q4_K rows fetched into shared memory by one bulk copy, checked against the
// register kernel's outputs first). `./matvec_layers ring`: the whole token as ONE persistent
// launch (a shared-memory ring fed by bulk copies; consumer loads batched U steps at a time);
// `./matvec_layers ring1`: the same ring as one launch per matrix with dependent launch (also
// at half an SM: an 80 KB ring and 8 consumer warps, 2 blocks an SM);
// `./matvec_layers half`: Q4_K by 4 lanes a block, and each side of the ring timed alone;
// `./matvec_layers ring rpt2|nosplit`: two rows per warp, or no row split over warps.
// The kernels restate flea's (crates/flea-cuda/src/kernels.cu) compactly; Q6_K in the
// repacked layout of resident weights. Numbers: docs/BENCHMARKS.md ("fewer dependent round
// trips per layer"; "prompt attention in tiles; two decode ideas that did not pay"; "the fused
// resident decode"; "four more tries at the 0.7 roofline").
//   nvcc -O3 -std=c++17 -arch=sm_90 -o matvec_layers scripts/gpu_matvec_layers.cu && ./matvec_layers
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>
#include "gpu_check.h"
typedef unsigned char u8; typedef signed char i8; typedef unsigned short u16; typedef unsigned int u32;
__device__ __forceinline__ float h2f(u16 h){float f; asm("{cvt.f32.f16 %0, %1;}":"=f"(f):"h"(h)); return f;}
__device__ __forceinline__ float warp_sum(float v){
#pragma unroll
 for(int o=16;o>0;o>>=1) v+=__shfl_xor_sync(0xffffffff,v,o); return v;}
__device__ __forceinline__ int dp4a(int a,int b,int c){return __dp4a(a,b,c);}
__device__ __forceinline__ int q6(u32 lo4,u32 hi2){const u32 q=lo4|(hi2<<4); return (int)((q+0x60606060u)^0x80808080u);}
struct Q6KRaw{int a0,a1,b0,b1,h0,h1; int sc01,sc23; u16 d;};
__device__ __forceinline__ float q6_dot(const Q6KRaw&r,int blk,int p,const i8*__restrict__ xq,const float*__restrict__ xd){
 const int n=p>>2,l0=8*(p&3); const int g=l0>=16?8:0; const i8* a=xq+blk*256+64*n+l0;
 const int2 a0=*(const int2*)a; const int2 a1=*(const int2*)(a+128); const int2 a2=*(const int2*)(a+32); const int2 a3=*(const int2*)(a+160);
 const float yd=xd[blk]; const u32 A0=r.a0,A1=r.a1,B0=r.b0,B1=r.b1,H0=r.h0,H1=r.h1; const u32 M4=0x0f0f0f0fu,M2=0x03030303u;
 int d0=dp4a(q6(A0&M4,H0&M2),a0.x,dp4a(q6(A1&M4,H1&M2),a0.y,0));
 int d1=dp4a(q6(B0&M4,(H0>>2)&M2),a1.x,dp4a(q6(B1&M4,(H1>>2)&M2),a1.y,0));
 int d2=dp4a(q6((A0>>4)&M4,(H0>>4)&M2),a2.x,dp4a(q6((A1>>4)&M4,(H1>>4)&M2),a2.y,0));
 int d3=dp4a(q6((B0>>4)&M4,(H0>>6)&M2),a3.x,dp4a(q6((B1>>4)&M4,(H1>>6)&M2),a3.y,0));
 const u32 s01=(u32)r.sc01,s23=(u32)r.sc23; const int sc0=(int)(i8)((s01>>g)&0xff),sc1=(int)(i8)((s01>>(16+g))&0xff),sc2=(int)(i8)((s23>>g)&0xff),sc3=(int)(i8)((s23>>(16+g))&0xff);
 return (h2f(r.d)*yd)*(float)(sc0*d0+sc1*d1+sc2*d2+sc3*d3);}
struct Q4KRaw { uint4 hdr, qs; };
__device__ __forceinline__ void scale_min(int s,u32 y,u32 z,u32 w,int&sc,int&m){
 const int sh=8*(s&3); const int by=(y>>sh)&0xff,bz=(z>>sh)&0xff,bw=(w>>sh)&0xff;
 if(s<4){sc=by&63;m=bz&63;}else{sc=(bw&15)|((by>>6)<<4);m=(bw>>4)|((bz>>6)<<4);} }
__device__ __forceinline__ void q4k_load(const u8* __restrict__ wr,int blk,int p,Q4KRaw&r){
 const uint4* b=(const uint4*)(wr+(long long)blk*144); r.hdr=__ldg(b); r.qs=__ldg(b+1+p);}
__device__ __forceinline__ float q4k_dot(const Q4KRaw&r,int blk,int p,const i8*__restrict__ xq,const float*__restrict__ xd,const int*__restrict__ xs){
 const int j=p>>1; const i8* a=xq+blk*256+16*p; const int4 alo=*(const int4*)a; const int4 ahi=*(const int4*)(a+128);
 const int2 sums=*(const int2*)(xs+blk*16+2*p); const float yd=xd[blk];
 const u32 q[4]={r.qs.x,r.qs.y,r.qs.z,r.qs.w}; const int al[4]={alo.x,alo.y,alo.z,alo.w}; const int ah[4]={ahi.x,ahi.y,ahi.z,ahi.w};
 int dlo=0,dhi=0;
#pragma unroll
 for(int k=0;k<4;k++){dlo=dp4a((int)(q[k]&0x0f0f0f0fu),al[k],dlo); dhi=dp4a((int)((q[k]>>4)&0x0f0f0f0fu),ah[k],dhi);}
 int sc0,m0,sc1,m1; scale_min(2*j,r.hdr.y,r.hdr.z,r.hdr.w,sc0,m0); scale_min(2*j+1,r.hdr.y,r.hdr.z,r.hdr.w,sc1,m1);
 const float d=h2f((u16)(r.hdr.x&0xffff))*yd; const float dmin=h2f((u16)(r.hdr.x>>16))*yd;
 return d*(float)(sc0*dlo+sc1*dhi)-dmin*(float)(m0*sums.x+m1*sums.y);}


// Q6_K repacked per tensor: all ql | all qh | all scales | all d.
__device__ __forceinline__ void q6m_load(const u8*__restrict__ W,long long NB,long long B,int p,Q6KRaw&r){
 const int n=p>>2,l0=8*(p&3); const uint2 a=__ldg((const uint2*)(W+B*128+64*n+l0)); const uint2 b=__ldg((const uint2*)(W+B*128+64*n+32+l0));
 const uint2 h=__ldg((const uint2*)(W+NB*128+B*64+32*n+l0)); const uint2 sc=__ldg((const uint2*)(W+NB*192+B*16+8*n));
 r.a0=a.x;r.a1=a.y;r.b0=b.x;r.b1=b.y;r.h0=h.x;r.h1=h.y;r.sc01=sc.x;r.sc23=sc.y; r.d=__ldg((const u16*)(W+NB*208)+B);}
__device__ __forceinline__ void pdl_enter(){ asm volatile("griddepcontrol.wait;" ::: "memory"); asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void pf(const u8* p,long long bytes,int lane){ if((long long)lane*128<bytes) asm volatile("prefetch.global.L2 [%0];" ::"l"(p+lane*128)); }
#define KARGS const u8*__restrict__ W,const i8*__restrict__ xq,const float*__restrict__ xd,const int*__restrict__ xs,float*__restrict__ y,int rows,int cols
__global__ void __launch_bounds__(128) p4base(KARGS){
 const int warp=threadIdx.x>>5,lane=threadIdx.x&31; const int row=blockIdx.x*4+warp; if(row>=rows) return; const int nb=cols/256;
 const u8* wr=W+(long long)row*(nb*144); pf(wr,nb*144,lane); pdl_enter(); const int p=lane&7; float acc=0.f; int blk=lane>>3;
 for(;blk+4<nb;blk+=8){Q4KRaw r0,r1; q4k_load(wr,blk,p,r0); q4k_load(wr,blk+4,p,r1); acc+=q4k_dot(r0,blk,p,xq,xd,xs)+q4k_dot(r1,blk+4,p,xq,xd,xs);}
 if(blk<nb){Q4KRaw r0; q4k_load(wr,blk,p,r0); acc+=q4k_dot(r0,blk,p,xq,xd,xs);}
 const float v=warp_sum(acc); if(lane==0) y[row]=v;}
template<int NS> __global__ void __launch_bounds__(128) p4all(KARGS){
 const int warp=threadIdx.x>>5,lane=threadIdx.x&31; const int row=blockIdx.x*4+warp; if(row>=rows) return; const int nb=cols/256;
 const u8* wr=W+(long long)row*(nb*144); pf(wr,nb*144,lane); pdl_enter(); const int p=lane&7; const int b0=lane>>3; Q4KRaw r[NS];
#pragma unroll
 for(int s=0;s<NS;s++) q4k_load(wr,b0+4*s,p,r[s]);
 float acc=0.f;
#pragma unroll
 for(int s=0;s<NS;s++) acc+=q4k_dot(r[s],b0+4*s,p,xq,xd,xs);
 const float v=warp_sum(acc); if(lane==0) y[row]=v;}
// Q4_K with the block's 4 rows fetched into shared memory by one bulk (TMA) copy issued
// before the dependent-launch wait, then the same lane mapping and sums as p4base.
__device__ __forceinline__ u32 smem_u32(const void* p){ return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void q4k_load_s(const u8* wr,int blk,int p,Q4KRaw&r){
 const uint4* b=(const uint4*)(wr+blk*144); r.hdr=b[0]; r.qs=b[1+p];}
__global__ void __launch_bounds__(128) p4tma(KARGS){
 extern __shared__ __align__(128) u8 sw[];
 __shared__ __align__(8) unsigned long long bar;
 const int warp=threadIdx.x>>5,lane=threadIdx.x&31; const int row0=blockIdx.x*4; const int nb=cols/256; const int rb=nb*144;
 const u32 bytes=(u32)(min(4,rows-row0)*rb); const u32 sb=smem_u32(&bar);
 if(threadIdx.x==0){
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;"::"r"(sb));
  asm volatile("fence.mbarrier_init.release.cluster;":::"memory");
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;"::"r"(sb),"r"(bytes):"memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"::"r"(smem_u32(sw)),"l"(W+(long long)row0*rb),"r"(bytes),"r"(sb):"memory");
 }
 __syncthreads();
 pdl_enter();
 {u32 done=0; while(!done){ asm volatile("{.reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0; selp.u32 %0,1,0,p;}":"=r"(done):"r"(sb):"memory"); }}
 const int row=row0+warp; if(row>=rows) return;
 const u8* wr=sw+warp*rb; const int p=lane&7; float acc=0.f; int blk=lane>>3;
 for(;blk+4<nb;blk+=8){Q4KRaw r0,r1; q4k_load_s(wr,blk,p,r0); q4k_load_s(wr,blk+4,p,r1); acc+=q4k_dot(r0,blk,p,xq,xd,xs)+q4k_dot(r1,blk+4,p,xq,xd,xs);}
 if(blk<nb){Q4KRaw r0; q4k_load_s(wr,blk,p,r0); acc+=q4k_dot(r0,blk,p,xq,xd,xs);}
 const float v=warp_sum(acc); if(lane==0) y[row]=v;}
// Q6_K soa, S steps of 4 blocks in flight per round
template<int S> __global__ void __launch_bounds__(128) p6(KARGS){
 const int warp=threadIdx.x>>5,lane=threadIdx.x&31; const int row=blockIdx.x*4+warp; if(row>=rows) return; const int nb=cols/256; const long long NB=(long long)rows*nb;
 const long long B0=(long long)row*nb; pf(W+B0*128,(long long)nb*128,lane); pdl_enter(); const int p=lane&7; float acc=0.f; int blk=lane>>3;
 for(;blk+4*(S-1)<nb;blk+=4*S){Q6KRaw r[S];
#pragma unroll
  for(int s=0;s<S;s++) q6m_load(W,NB,B0+blk+4*s,p,r[s]);
#pragma unroll
  for(int s=0;s<S;s++) acc+=q6_dot(r[s],blk+4*s,p,xq,xd);}
 for(;blk<nb;blk+=4){Q6KRaw r0; q6m_load(W,NB,B0+blk,p,r0); acc+=q6_dot(r0,blk,p,xq,xd);}
 const float v=warp_sum(acc); if(lane==0) y[row]=v;}
__global__ void __launch_bounds__(128) pread(KARGS){
 const int warp=threadIdx.x>>5,lane=threadIdx.x&31; const int row=blockIdx.x*4+warp; if(row>=rows) return; const int rowbytes=cols;
 const u32* w=(const u32*)(W+(long long)row*rowbytes); pf((const u8*)w,rowbytes,lane); pdl_enter(); const int n=rowbytes/4; u32 acc=0;
 for(int i=lane;i<n;i+=128){u32 a=__ldg(w+i); u32 b=i+32<n?__ldg(w+i+32):0; u32 c=i+64<n?__ldg(w+i+64):0; u32 d=i+96<n?__ldg(w+i+96):0; acc^=a^b^c^d;}
 if(lane==0) y[row]=(float)acc;}

// ---- ring: the token's mat-vecs in ONE persistent launch --------------------------------------
// One block per SM. A producer warp streams the block's row chunks (every matrix of the token in
// order; chunk g of the token goes to block g % grid) into a RING_STAGES-deep shared-memory ring
// by bulk (TMA) copies; NW consumer warps compute them. A chunk of C rows is C * WPR tasks (WPR
// slices of each row); consumer warp w takes the block's tasks w, w + NW, ... counted across
// chunks, so a warp with nothing in one chunk moves on to the next. Slices use the launch kernels'
// lane mapping and sums (WPR = 1 gives their bits); a row's slices are added in slice order by
// whichever warp finishes the row's last one. A grid barrier between matrices stands where a
// layer's other work would go: weights never wait on it, so the producer keeps streaming.
#define RING_BYTES (192 * 1024)
#define RING_XQ (14 * 1024)
#define RING_MAXC 16
#define RING_MAXW 8
#define RING_MAXST 8
#define RING_SMEM (RING_BYTES + RING_XQ + 256 + 3584 + RING_MAXST * RING_MAXC * (RING_MAXW + 1) * 4 + 2 * RING_MAXST * 8)
struct RingMat { const u8* w; float* y; int ty, rows, cols, crows, wpr, rpt; int chunk0, nch, lwpr; };
__device__ __forceinline__ void mb_wait(u32 bar, u32 parity){
 for(long long spin=0;;spin++){ u32 done; asm volatile("{.reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0,1,0,p;}":"=r"(done):"r"(bar),"r"(parity):"memory"); if(done) return; if(spin>(1ll<<26)) __trap(); } }
// The producer's wait: a warp spinning on try_wait takes issue slots from the consumers on its
// scheduler, so it backs off after a few tries.
__device__ __forceinline__ void mb_wait_backoff(u32 bar, u32 parity){
 for(long long spin=0;;spin++){ u32 done; asm volatile("{.reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0,1,0,p;}":"=r"(done):"r"(bar),"r"(parity):"memory"); if(done) return; if(spin>4) __nanosleep(128); if(spin>(1ll<<24)) __trap(); } }
__device__ __forceinline__ int dp4a_us(u32 a,int b,int c){ int d; asm("dp4a.u32.s32 %0, %1, %2, %3;":"=r"(d):"r"(a),"r"(b),"r"(c)); return d; }
// Q4_K dot for the ring: high nibbles multiplied in place (q & 0xf0 = 16 * nibble, unsigned)
// and the sum divided by 16 (exact): no shifts. Branch-free scales. Same value as q4k_dot.
// Q4_K dot for the ring: high nibbles multiplied in place (q & 0xf0 = 16 * nibble, unsigned)
// and the sum divided by 16 (exact): no shifts. The lane's two sub-blocks' 6-bit scales and mins
// come out as byte pairs (branch-free) and meet the two 16-bit dot sums in one dp2a each. The
// integers are the ones q4k_dot computes, so the value is the same.
__device__ __forceinline__ int dp2a_lo(int a,u32 b,int c){ int d; asm("dp2a.lo.s32.u32 %0, %1, %2, %3;":"=r"(d):"r"(a),"r"(b),"r"(c)); return d; }
__device__ __forceinline__ int pack16(int lo,int hi){ return (int)__byte_perm((u32)lo,(u32)hi,0x5410); }
// Per-lane masks picking the scale bits: sub-blocks < 4 (lanes j < 2) take 6 bits of Y/Z; the
// others 4 bits of W (low / high nibble) and the top 2 bits of Y/Z. Loop-invariant, so no branch.
struct Q4Masks { u32 y, w, y2; };
__device__ __forceinline__ Q4Masks q4_masks(int j){ return j<2 ? Q4Masks{0x3f3fu,0u,0u} : Q4Masks{0u,0x0f0fu,0x3030u}; }
__device__ __forceinline__ float q4k_ring_dot(const Q4KRaw&r,const int4&alo,const int4&ahi,int2 sums,float yd,int j,const Q4Masks&mk){
 const u32 q[4]={r.qs.x,r.qs.y,r.qs.z,r.qs.w}; const int al[4]={alo.x,alo.y,alo.z,alo.w}; const int ah[4]={ahi.x,ahi.y,ahi.z,ahi.w};
 int lo=0,hi16=0;
#pragma unroll
 for(int k=0;k<4;k++){ lo=dp4a((int)(q[k]&0x0f0f0f0fu),al[k],lo); hi16=dp4a_us(q[k]&0xf0f0f0f0u,ah[k],hi16); }
 const int sh=16*(j&1); const u32 Y=r.hdr.y>>sh, Z=r.hdr.z>>sh, W=r.hdr.w>>sh;
 const u32 S=(Y&mk.y)|(W&mk.w)|((Y>>2)&mk.y2), M=(Z&mk.y)|((W>>4)&mk.w)|((Z>>2)&mk.y2);
 const int isum=dp2a_lo(pack16(lo,hi16>>4),S,0), msum=dp2a_lo(pack16(sums.x,sums.y),M,0);
 const float d=h2f((u16)(r.hdr.x&0xffff))*yd; const float dmin=h2f((u16)(r.hdr.x>>16))*yd;
 return d*(float)isum-dmin*(float)msum;}
// One lane's part of blocks blk of rows wr0 (and wr1 when TWO): activations loaded once.
template<bool TWO> __device__ __forceinline__ void q4k_ring_step(const u8* wr0,const u8* wr1,int blk,int p,const i8* sxq,const float* sxd,const int* sxs,float& acc0,float& acc1,const Q4Masks& mk){
 Q4KRaw r0,r1; q4k_load_s(wr0,blk,p,r0); if(TWO) q4k_load_s(wr1,blk,p,r1);
 const i8* a=sxq+blk*256+16*p; const int4 alo=*(const int4*)a; const int4 ahi=*(const int4*)(a+128);
 const int2 sums=*(const int2*)(sxs+blk*16+2*p); const float yd=sxd[blk]; const int j=p>>1;
 acc0+=q4k_ring_dot(r0,alo,ahi,sums,yd,j,mk); if(TWO) acc1+=q4k_ring_dot(r1,alo,ahi,sums,yd,j,mk); }
// Q4_K by 4 lanes a block (U = 0 in ring_token): lane q takes the block's quant bytes
// 32q .. 32q + 31 (sub-blocks 2q and 2q + 1, the work of the 8-lane mapping's lanes 2q and
// 2q + 1), so the header, scales and address work is paid once per 64 weights instead of 32.
// The same integers as q4k_ring_dot's two lanes, added before the float scaling.
__device__ __forceinline__ float q4k_half_step(const u8* wr,int blk,int q,const i8* sxq,const float* sxd,const int* sxs,const Q4Masks& mk){
 const uint4* b=(const uint4*)(wr+blk*144); const uint4 hdr=b[0], q0=b[1+2*q], q1=b[2+2*q];
 const i8* a=sxq+blk*256+32*q; const int4 l0=*(const int4*)a, l1=*(const int4*)(a+16), h0=*(const int4*)(a+128), h1=*(const int4*)(a+144);
 const int4 sm4=*(const int4*)(sxs+blk*16+4*q); const float yd=sxd[blk];
 const u32 w0[4]={q0.x,q0.y,q0.z,q0.w}, w1[4]={q1.x,q1.y,q1.z,q1.w};
 const int al0[4]={l0.x,l0.y,l0.z,l0.w}, al1[4]={l1.x,l1.y,l1.z,l1.w}, ah0[4]={h0.x,h0.y,h0.z,h0.w}, ah1[4]={h1.x,h1.y,h1.z,h1.w};
 int lo0=0,hi0=0,lo1=0,hi1=0;
#pragma unroll
 for(int k=0;k<4;k++){ lo0=dp4a((int)(w0[k]&0x0f0f0f0fu),al0[k],lo0); hi0=dp4a_us(w0[k]&0xf0f0f0f0u,ah0[k],hi0);
  lo1=dp4a((int)(w1[k]&0x0f0f0f0fu),al1[k],lo1); hi1=dp4a_us(w1[k]&0xf0f0f0f0u,ah1[k],hi1); }
 const int sh=16*(q&1); const u32 Y=hdr.y>>sh, Z=hdr.z>>sh, W=hdr.w>>sh;
 const u32 S=(Y&mk.y)|(W&mk.w)|((Y>>2)&mk.y2), M=(Z&mk.y)|((W>>4)&mk.w)|((Z>>2)&mk.y2);
 const int isum=dp2a_lo(pack16(lo0,hi0>>4),S,dp2a_lo(pack16(lo1,hi1>>4),S,0));
 const int msum=dp2a_lo(pack16(sm4.x,sm4.y),M,dp2a_lo(pack16(sm4.z,sm4.w),M,0));
 const float d=h2f((u16)(hdr.x&0xffff))*yd; const float dmin=h2f((u16)(hdr.x>>16))*yd;
 return d*(float)isum-dmin*(float)msum;}
__device__ __forceinline__ void bulk_g2s(u32 dst,const void* src,u32 bytes,u32 bar){
 asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"::"r"(dst),"l"(src),"r"(bytes),"r"(bar):"memory"); }
template<int NW> __device__ __forceinline__ void consumers_sync(){ asm volatile("bar.sync 1, %0;"::"n"(NW*32):"memory"); }
// Q6_K repacked rows in the ring: ql | qh | scales of the chunk's nbk blocks; d from global (dg).
__device__ __forceinline__ void q6s_load_s(const u8* st,const u16* dg,int nbk,int B,int p,Q6KRaw&r){
 const int n=p>>2,l0=8*(p&3); const uint2 a=*(const uint2*)(st+B*128+64*n+l0); const uint2 b=*(const uint2*)(st+B*128+64*n+32+l0);
 const uint2 h=*(const uint2*)(st+nbk*128+B*64+32*n+l0); const uint2 sc=*(const uint2*)(st+nbk*192+B*16+8*n);
 r.a0=a.x;r.a1=a.y;r.b0=b.x;r.b1=b.y;r.h0=h.x;r.h1=h.y;r.sc01=sc.x;r.sc23=sc.y; r.d=__ldg(dg+B);}
__device__ __forceinline__ int ring_nch(const RingMat& m){ return m.nch; }
// Chunk gl of matrix M (C rows) into the stage at dst, counted on its full barrier fb: Q4_K rows
// as one range, repacked Q6_K as three (ql | qh | scales).
__device__ __forceinline__ void ring_copy_chunk(const RingMat& M,int gl,u32 dst,u32 fb){
 const int nb=M.cols/256; const long long row0=(long long)gl*M.crows; const int nr=(int)min((long long)M.crows,M.rows-row0);
 if(M.ty==4){ const u32 bytes=(u32)(nr*nb*144); asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"::"r"(fb),"r"(bytes):"memory"); bulk_g2s(dst,M.w+row0*nb*144,bytes,fb); }
 else { const long long NB=(long long)M.rows*nb, B0=row0*nb; const u32 nbk=(u32)(nr*nb);
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"::"r"(fb),"r"(nbk*208):"memory");
  bulk_g2s(dst,M.w+B0*128,nbk*128,fb); bulk_g2s(dst+nbk*128,M.w+NB*128+B0*64,nbk*64,fb); bulk_g2s(dst+nbk*192,M.w+NB*192+B0*16,nbk*16,fb); } }
// A lane's part of row r's Q6_K slice (blocks blk, blk + stp, ...) from the stage st; 3 steps'
// loads in flight.
__device__ __forceinline__ float ring_q6_task(const RingMat& M,const u8* st,int row0,int nr,int r,int blk,int stp,int p,const i8* sxq,const float* sxd){
 const int nb=M.cols/256, nbk=nr*nb, B=r*nb; const u16* dg=(const u16*)(M.w+(long long)M.rows*nb*208)+(long long)row0*nb; float acc=0.f;
 for(;blk+2*stp<nb;blk+=3*stp){Q6KRaw q[3];
#pragma unroll
  for(int u=0;u<3;u++) q6s_load_s(st,dg,nbk,B+blk+u*stp,p,q[u]);
#pragma unroll
  for(int u=0;u<3;u++) acc+=q6_dot(q[u],blk+u*stp,p,sxq,sxd);}
 for(;blk<nb;blk+=stp){Q6KRaw q0; q6s_load_s(st,dg,nbk,B+blk,p,q0); acc+=q6_dot(q0,blk,p,sxq,sxd);}
 return acc; }
// Lane 0's slice k (of WPR) of row `row` of the chunk in stage s: written out directly, or kept
// in shared memory until the row's last slice, which adds them in slice order.
__device__ __forceinline__ void ring_row_out(const RingMat& M,int s,int row0,int row,int k,int WPR,float v,float* part,int* rcnt){
 if(WPR==1){ M.y[row0+row]=v; return; }
 float* pr=part+(s*RING_MAXC+row)*RING_MAXW; pr[k]=v; __threadfence_block();
 if(atomicAdd(rcnt+s*RING_MAXC+row,1)==WPR-1){ __threadfence_block(); float tot=pr[0]; for(int q=1;q<WPR;q++) tot+=pr[q]; M.y[row0+row]=tot; rcnt[s*RING_MAXC+row]=0; } }
// The ring kernels' shared memory: ring | activations (quants, scales, sums) | row partials and
// their counters | full and empty mbarriers per stage (initialised here, the block synced).
struct RingSmem { u8* ring; i8* sxq; float* sxd; int* sxs; float* part; int* rcnt; u32 full0, empty0; };
template<int NW,int RING_STAGES,int RB=RING_BYTES> __device__ __forceinline__ RingSmem ring_smem_init(u8* sm){
 RingSmem r; r.ring=sm; r.sxq=(i8*)(sm+RB); r.sxd=(float*)(r.sxq+RING_XQ); r.sxs=(int*)((u8*)r.sxd+256);
 r.part=(float*)((u8*)r.sxs+3584); r.rcnt=(int*)(r.part+RING_STAGES*RING_MAXC*RING_MAXW);
 unsigned long long* mbar=(unsigned long long*)(r.rcnt+RING_STAGES*RING_MAXC);
 r.full0=smem_u32(mbar); r.empty0=smem_u32(mbar+RING_STAGES);
 for(int i=threadIdx.x;i<RING_STAGES*RING_MAXC;i+=blockDim.x) r.rcnt[i]=0;
 if(threadIdx.x==0){ for(int s=0;s<RING_STAGES;s++){ asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;"::"r"(r.full0+8*s)); asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;"::"r"(r.empty0+8*s),"r"(NW)); }
  asm volatile("fence.mbarrier_init.release.cluster;":::"memory"); }
 __syncthreads();
 return r; }
template<int NW,int RING_STAGES,int COMPUTE,int U> __global__ void __launch_bounds__((NW+1)*32,1)
 ring_token(const RingMat* __restrict__ mats,int nmats,const i8* xq,const float* xd,const int* xs,unsigned* gbar,int barrier){
 constexpr int RING_STAGE_BYTES=RING_BYTES/RING_STAGES;
 extern __shared__ __align__(128) u8 sm[];
 const RingSmem R=ring_smem_init<NW,RING_STAGES>(sm);
 u8* ring=R.ring; i8* sxq=R.sxq; float* sxd=R.sxd; int* sxs=R.sxs; float* part=R.part; int* rcnt=R.rcnt; const u32 full0=R.full0, empty0=R.empty0;
 const int warp=threadIdx.x>>5,lane=threadIdx.x&31; const int G=gridDim.x, b=blockIdx.x;
 const RingMat last=mats[nmats-1]; const int total=last.chunk0+ring_nch(last);
 if(warp==NW){ // producer (none with COMPUTE 2: the consumers then time their own work alone)
  if(lane!=0 || COMPUTE==2) return;
  int m=0; u32 it=0;
  for(int g=b; g<total; g+=G, it++){
   while(g>=mats[m].chunk0+ring_nch(mats[m])) m++;
   const RingMat M=mats[m]; const int s=(int)(it%RING_STAGES); const u32 ph=(u32)((it/RING_STAGES)&1);
   mb_wait_backoff(empty0+8*s,ph^1);
   ring_copy_chunk(M,g-M.chunk0,smem_u32(ring+s*RING_STAGE_BYTES),full0+8*s);
  }
  return;
 }
 // consumers
 int g=b, tw=warp; u32 it=0; const int ct=threadIdx.x;
 for(int m=0;m<nmats;m++){
  const RingMat M=mats[m]; const int nb=M.cols/256;
  if(m>0){ consumers_sync<NW>(); if(ct==0){ __threadfence(); atomicAdd(gbar,1u);
    if(barrier&1){ const unsigned target=(unsigned)(m*G); for(long long spin=0;;spin++){ unsigned v; asm volatile("ld.acquire.gpu.u32 %0, [%1];":"=r"(v):"l"(gbar):"memory"); if(v>=target) break; if(spin>8) __nanosleep(64); if(spin>(1ll<<24)) __trap(); } } }
   consumers_sync<NW>(); }
  if(COMPUTE){ for(int i=ct;i<M.cols/16;i+=NW*32){ ((int4*)sxq)[i]=__ldcg((const int4*)xq+i); sxs[i]=__ldcg(xs+i);} for(int i=ct;i<nb;i+=NW*32) sxd[i]=__ldcg(xd+i); consumers_sync<NW>(); }
  const int C=M.crows, WPR=M.wpr, LW=M.lwpr, RPT=M.rpt, T=(C/RPT)*WPR, p=lane&7, stp=4*WPR, gend=M.chunk0+M.nch;
  for(; g<gend; g+=G, it++){
   const int s=(int)(it%RING_STAGES); const u32 ph=(u32)((it/RING_STAGES)&1);
   if(COMPUTE!=2) mb_wait(full0+8*s,ph);
   const int row0=(g-M.chunk0)*C; const int nr=min(C,M.rows-row0);
   const u8* st=ring+s*RING_STAGE_BYTES;
   // this warp's tasks tw, tw + NW, ... of the chunk; tw carries over to the next chunk
   for(; tw<T; tw+=NW){ if(!COMPUTE) continue; const int t=tw;
    const int r=(t>>LW)*RPT, k=t&(WPR-1); if(r>=nr) continue;
    if((barrier&2) && M.ty==6) continue; // dots-only timing of one type (barrier bit 1: skip Q6_K, bit 2: skip Q4_K)
    if((barrier&4) && M.ty==4) continue;
    if(U==0 && M.ty==4){ // half-warp rows: lanes 0-15 row r, 16-31 row r + 1 (RPT 2, WPR 1)
     const int hr=r+(lane>>4), q=lane&3; float acc=0.f;
     if(hr<nr){ const u8* wr=st+hr*nb*144; const Q4Masks mk=q4_masks(q); for(int blk=(lane>>2)&3;blk<nb;blk+=4) acc+=q4k_half_step(wr,blk,q,sxq,sxd,sxs,mk); }
#pragma unroll
     for(int o=8;o>0;o>>=1) acc+=__shfl_xor_sync(0xffffffffu,acc,o);
     if((lane&15)==0 && hr<nr) M.y[row0+hr]=acc;
     continue; }
    float acc=0.f, acc1=0.f; int blk=(lane>>3)+4*k;
    if(M.ty==4){ const u8* wr=st+r*nb*144; const Q4Masks mk=q4_masks(p>>1);
     if(RPT==2) for(;blk<nb;blk+=stp) q4k_ring_step<true>(wr,wr+nb*144,blk,p,sxq,sxd,sxs,acc,acc1,mk);
     else { // U steps' loads issued together, then their dots in order (the same sum)
      constexpr int UU=U>0?U:1;
      for(;blk+(UU-1)*stp<nb;blk+=UU*stp){ Q4KRaw rq[UU]; int4 alo[UU],ahi[UU]; int2 sm2[UU]; float yd[UU];
#pragma unroll
       for(int u=0;u<UU;u++){ const int bk=blk+u*stp; q4k_load_s(wr,bk,p,rq[u]); const i8* a=sxq+bk*256+16*p; alo[u]=*(const int4*)a; ahi[u]=*(const int4*)(a+128); sm2[u]=*(const int2*)(sxs+bk*16+2*p); yd[u]=sxd[bk]; }
#pragma unroll
       for(int u=0;u<UU;u++) acc+=q4k_ring_dot(rq[u],alo[u],ahi[u],sm2[u],yd[u],p>>1,mk); }
      for(;blk<nb;blk+=stp) q4k_ring_step<false>(wr,wr,blk,p,sxq,sxd,sxs,acc,acc1,mk); } }
    else acc=ring_q6_task(M,st,row0,nr,r,blk,stp,p,sxq,sxd);
#pragma unroll
    for(int rr=0;rr<2;rr++){ if(rr>=RPT) break; const float v=warp_sum(rr?acc1:acc); const int row=r+rr;
     if(lane==0 && row<nr) ring_row_out(M,s,row0,row,k,WPR,v,part,rcnt); }
   }
   tw-=T;
   __syncwarp();
   if(lane==0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];"::"r"(empty0+8*s):"memory");
  }
 }
}
// ---- ring1: the same ring, ONE matrix per launch, with dependent launch ---------------------
// Weights never depend on the previous kernel, so the producer starts streaming this block's
// chunks as soon as the block is resident (the previous kernel's block on this SM has exited),
// before the dependent-launch wait; the consumers wait for the previous grid (its writes are
// the activations), load the activations, then compute as ring_token does. Whether the
// per-launch start and tail cost what a grid barrier costs the one-launch ring.
// RB / MINB (`ring1` second run): a ring of RB bytes and MINB blocks an SM, so that the next
// launch's block is resident, and its producer streaming, while this one computes.
template<int NW,int RING_STAGES,int RB=RING_BYTES,int MINB=1> __global__ void __launch_bounds__((NW+1)*32,MINB)
 ring_one(const RingMat M,const i8* xq,const float* xd,const int* xs){
 constexpr int RING_STAGE_BYTES=RB/RING_STAGES;
 extern __shared__ __align__(128) u8 sm[];
 const RingSmem R=ring_smem_init<NW,RING_STAGES,RB>(sm);
 u8* ring=R.ring; i8* sxq=R.sxq; float* sxd=R.sxd; int* sxs=R.sxs; float* part=R.part; int* rcnt=R.rcnt; const u32 full0=R.full0, empty0=R.empty0;
 const int warp=threadIdx.x>>5,lane=threadIdx.x&31; const int G=gridDim.x, b=blockIdx.x;
 const int nb=M.cols/256;
 if(warp==NW){ // producer
  if(lane!=0) return;
  asm volatile("griddepcontrol.launch_dependents;":::"memory");
  u32 it=0;
  for(int g=b; g<M.nch; g+=G, it++){
   const int s=(int)(it%RING_STAGES); const u32 ph=(u32)((it/RING_STAGES)&1);
   mb_wait_backoff(empty0+8*s,ph^1);
   ring_copy_chunk(M,g,smem_u32(ring+s*RING_STAGE_BYTES),full0+8*s);
  }
  return;
 }
 pdl_enter();
 const int ct=threadIdx.x;
 for(int i=ct;i<M.cols/16;i+=NW*32){ ((int4*)sxq)[i]=__ldcg((const int4*)xq+i); sxs[i]=__ldcg(xs+i);} for(int i=ct;i<nb;i+=NW*32) sxd[i]=__ldcg(xd+i);
 consumers_sync<NW>();
 int tw=warp; u32 it=0;
 const int C=M.crows, WPR=M.wpr, LW=M.lwpr, T=C*WPR, p=lane&7, stp=4*WPR;
 for(int g=b; g<M.nch; g+=G, it++){
  const int s=(int)(it%RING_STAGES); const u32 ph=(u32)((it/RING_STAGES)&1);
  mb_wait(full0+8*s,ph);
  const int row0=g*C; const int nr=min(C,M.rows-row0);
  const u8* st=ring+s*RING_STAGE_BYTES;
  for(; tw<T; tw+=NW){ const int r=tw>>LW, k=tw&(WPR-1); if(r>=nr) continue;
   float acc=0.f, acc1=0.f; int blk=(lane>>3)+4*k;
   if(M.ty==4){ const u8* wr=st+r*nb*144; const Q4Masks mk=q4_masks(p>>1); for(;blk<nb;blk+=stp) q4k_ring_step<false>(wr,wr,blk,p,sxq,sxd,sxs,acc,acc1,mk); }
   else acc=ring_q6_task(M,st,row0,nr,r,blk,stp,p,sxq,sxd);
   const float v=warp_sum(acc);
   if(lane==0) ring_row_out(M,s,row0,r,k,WPR,v,part,rcnt);
  }
  tw-=T;
  __syncwarp();
  if(lane==0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];"::"r"(empty0+8*s):"memory");
 }
}
// Random weight bytes (timing on a constant pattern could flatter the memory system).
__global__ void fill_words(u32* w,size_t n,u32 seed){ for(size_t i=blockIdx.x*(size_t)blockDim.x+threadIdx.x;i<n;i+=(size_t)gridDim.x*blockDim.x){ u32 h=(u32)i*2654435761u^seed*0x9e3779b9u; h^=h>>15; h*=0x85ebca6bu; h^=h>>13; w[i]=h;} }
static void fill_random(u8* w,size_t bytes,u32 seed){ fill_words<<<1024,256>>>((u32*)w,bytes/4,seed); CK(cudaGetLastError()); CK(cudaDeviceSynchronize()); }
struct Mat{int ty,rows,cols; u8* w; size_t bytes;};
typedef void(*KF)(const u8*,const i8*,const float*,const int*,float*,int,int);
static bool g_pdl=true;
static void L(KF f,int grid,cudaStream_t st,const u8* w,const i8* xq,const float* xd,const int* xs,float* y,int rows,int cols,int smem=0){
 cudaLaunchConfig_t c={}; c.gridDim=dim3(grid); c.blockDim=dim3(128); c.stream=st; c.dynamicSmemBytes=smem; cudaLaunchAttribute a[1]; a[0].id=cudaLaunchAttributeProgrammaticStreamSerialization; a[0].val.programmaticStreamSerializationAllowed=1; c.attrs=a; c.numAttrs=g_pdl?1:0;
 CK(cudaLaunchKernelEx(&c,f,w,xq,xd,xs,y,rows,cols));}
enum {V_BASE=0,V_READ=1,V_ALL=2,V_Q6S3=3,V_Q6S4=4,V_TMA=5};
static void launch(const Mat& m,int var,const i8* xq,const float* xd,const int* xs,float* y,cudaStream_t st){
 int grid=(m.rows+3)/4;
 if(var==V_READ){ L(pread,grid,st,m.w,xq,xd,xs,y,m.rows,(int)(m.bytes/m.rows)); return; }
 if(m.ty==6){ KF f=p6<2>; if(var==V_ALL) f=(m.cols==5120?(KF)p6<5>:(KF)p6<4>); if(var==V_Q6S3||var==V_TMA) f=p6<3>; if(var==V_Q6S4) f=p6<4>; L(f,grid,st,m.w,xq,xd,xs,y,m.rows,m.cols); return; }
 if(var==V_TMA){ L(p4tma,grid,st,m.w,xq,xd,xs,y,m.rows,m.cols,4*(m.cols/256)*144); return; }
 if(var==V_ALL && m.cols==5120){ L(p4all<5>,grid,st,m.w,xq,xd,xs,y,m.rows,m.cols); return; }
 L(p4base,grid,st,m.w,xq,xd,xs,y,m.rows,m.cols);}
// Chunk rows C: the most of 16, 8, 4, 2, 1 whose bytes fit a stage; WPR slices per row so that
// a chunk has at least 16 tasks (up to RING_MAXW).
static int g_rpt=1, g_split=1, g_half=0, g_dots=0;
static std::vector<RingMat> ring_table(const std::vector<Mat>& mats,size_t n,float* yr,bool own_y,int stage_bytes){
 std::vector<RingMat> rm; long long c0=0;
 for(size_t i=0;i<n;i++){ const Mat& q=mats[i]; const int nb=q.cols/256, rb=nb*(q.ty==4?144:208); int cr=16; while(cr>1 && cr*rb>stage_bytes) cr/=2;
  const bool half=g_half && q.ty==4; const int rpt=half?2:(q.ty==4&&cr>=2?g_rpt:1); int wp=1, lw=0; while(!half && g_split && (cr/rpt)*wp<16 && wp<RING_MAXW && 4*wp*2<=nb){ wp*=2; lw++; }
  const int nch=(q.rows+cr-1)/cr; rm.push_back(RingMat{q.w,yr+(own_y?i:i%5)*32768,q.ty,q.rows,q.cols,cr,wp,rpt,(int)c0,nch,lw}); c0+=nch; }
 return rm; }
template<int NW,int ST,int COMPUTE,int U> static void ring_launch(const RingMat* drm,int n,const i8* xq,const float* xd,const int* xs,unsigned* gbar,int barrier,int sms,cudaStream_t st){
 CK(cudaMemsetAsync(gbar,0,4,st)); cudaLaunchConfig_t c={}; c.gridDim=dim3(sms); c.blockDim=dim3((NW+1)*32); c.dynamicSmemBytes=RING_SMEM; c.stream=st;
 cudaLaunchAttribute a[1]; a[0].id=cudaLaunchAttributeCooperative; a[0].val.cooperative=1; c.attrs=a; c.numAttrs=1;
 CK(cudaLaunchKernelEx(&c,ring_token<NW,ST,COMPUTE,U>,drm,n,xq,xd,xs,gbar,barrier)); }
template<int NW,int ST,int U> static void ring_runs(const std::vector<Mat>& mats,const std::vector<std::vector<float>>& ref,const i8* xq,const float* xd,const int* xs,cudaStream_t st,int sms,size_t total){
 CK(cudaFuncSetAttribute(ring_token<NW,ST,1,U>,cudaFuncAttributeMaxDynamicSharedMemorySize,RING_SMEM));
 CK(cudaFuncSetAttribute(ring_token<NW,ST,0,U>,cudaFuncAttributeMaxDynamicSharedMemorySize,RING_SMEM));
 CK(cudaFuncSetAttribute(ring_token<NW,ST,2,U>,cudaFuncAttributeMaxDynamicSharedMemorySize,RING_SMEM));
 float* yr; CK(cudaMalloc(&yr,5*32768*4)); CK(cudaMemset(yr,0xff,5*32768*4)); unsigned* gbar; CK(cudaMalloc(&gbar,4));
 std::vector<RingMat> rm=ring_table(mats,5,yr,true,RING_BYTES/ST); RingMat* drm; CK(cudaMalloc(&drm,mats.size()*sizeof(RingMat)));
 CK(cudaMemcpy(drm,rm.data(),rm.size()*sizeof(RingMat),cudaMemcpyHostToDevice));
 ring_launch<NW,ST,1,U>(drm,5,xq,xd,xs,gbar,1,sms,st); CK(cudaStreamSynchronize(st));
 for(int i=0;i<5;i++){ const Mat& q=mats[i]; std::vector<float> rb(q.rows); CK(cudaMemcpy(rb.data(),yr+i*32768,q.rows*4,cudaMemcpyDeviceToHost)); const std::vector<float>& ra=ref[i];
  int nd=0,nan=0; double md=0,num=0,den=0; for(int j=0;j<q.rows;j++){ if(!(rb[j]==rb[j])) nan++; if(memcmp(&ra[j],&rb[j],4)) nd++; double d=(double)ra[j]-rb[j]; num+=d*d; den+=(double)ra[j]*ra[j]; md=fmax(md,fabs(d)/fmax(1e-30,fabs((double)ra[j]))); }
  printf("ring<%d,%d> U%d rpt %d split %d vs launch-per-matrix, Q%d_K %dx%d: %d of %d rows differ, %d unwritten/NaN, |diff|/|ref| %.3g, largest row rel %.3g\n",NW,ST,U,g_rpt,g_split,q.ty,q.rows,q.cols,nd,q.rows,nan,sqrt(num/fmax(den,1e-300)),md); }
 rm=ring_table(mats,mats.size(),yr,false,RING_BYTES/ST); CK(cudaMemcpy(drm,rm.data(),rm.size()*sizeof(RingMat),cudaMemcpyHostToDevice));
 cudaEvent_t f0,f1; CK(cudaEventCreate(&f0)); CK(cudaEventCreate(&f1));
 const char* rn[]={"barrier per matrix","no barrier","copies only, barrier","dots only (no copies)","dots only, Q4_K only","dots only, Q6_K only"};
 for(int v=0;v<6;v++){ if(v==2 && !(NW==16 && ST==4 && U==1)) continue; if(v>=3 && !g_dots) continue;
  auto go=[&](){ if(v>=3) ring_launch<NW,ST,2,U>(drm,(int)rm.size(),xq,xd,xs,gbar,v==3?0:v==4?2:4,sms,st); else if(v==2) ring_launch<NW,ST,0,U>(drm,(int)rm.size(),xq,xd,xs,gbar,1,sms,st); else ring_launch<NW,ST,1,U>(drm,(int)rm.size(),xq,xd,xs,gbar,v==0?1:0,sms,st); };
  go(); CK(cudaStreamSynchronize(st)); std::vector<float> ts;
  for(int r=0;r<9;r++){ CK(cudaEventRecord(f0,st)); go(); CK(cudaEventRecord(f1,st)); CK(cudaEventSynchronize(f1)); float ms; CK(cudaEventElapsedTime(&ms,f0,f1)); ts.push_back(ms); }
  std::sort(ts.begin(),ts.end()); printf("ring<%d,%d> U%d rpt %d split %d %-22s token: median %.3f ms (%.2f TB/s), best %.3f, worst %.3f\n",NW,ST,U,g_rpt,g_split,rn[v],ts[4],total/(ts[4]*1e-3)/1e12,ts[0],ts[8]); fflush(stdout); }
 CK(cudaFree(yr)); CK(cudaFree(gbar)); CK(cudaFree(drm)); }
template<int NW,int RB,int MINB> static void ring1_runs(const std::vector<Mat>& mats,const std::vector<std::vector<float>>& ref,const i8* xq,const float* xd,const int* xs,cudaStream_t st,int sms,size_t total){
 const int smem=RB+(RING_SMEM-RING_BYTES);
 CK(cudaFuncSetAttribute(ring_one<NW,4,RB,MINB>,cudaFuncAttributeMaxDynamicSharedMemorySize,smem));
 int per_sm=0; CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm,ring_one<NW,4,RB,MINB>,(NW+1)*32,smem));
 printf("ring1 with %d consumer warps, a %d KB ring: %d blocks an SM fit\n",NW,RB>>10,per_sm);
 float* yr; CK(cudaMalloc(&yr,5*32768*4)); CK(cudaMemset(yr,0xff,5*32768*4));
 std::vector<RingMat> rm=ring_table(mats,mats.size(),yr,false,RB/4); for(size_t i=0;i<rm.size();i++){ rm[i].chunk0=0; if(i<5) rm[i].y=yr+i*32768; }
 auto one=[&](const RingMat& m){ cudaLaunchConfig_t c={}; c.gridDim=dim3(sms); c.blockDim=dim3((NW+1)*32); c.dynamicSmemBytes=smem; c.stream=st;
  cudaLaunchAttribute a[1]; a[0].id=cudaLaunchAttributeProgrammaticStreamSerialization; a[0].val.programmaticStreamSerializationAllowed=1; c.attrs=a; c.numAttrs=1;
  CK(cudaLaunchKernelEx(&c,ring_one<NW,4,RB,MINB>,m,xq,xd,xs)); };
 for(int i=0;i<5;i++) one(rm[i]); CK(cudaStreamSynchronize(st));
 for(int i=0;i<5;i++){ const Mat& q=mats[i]; std::vector<float> rb(q.rows); CK(cudaMemcpy(rb.data(),yr+i*32768,q.rows*4,cudaMemcpyDeviceToHost)); const std::vector<float>& ra=ref[i];
  int nd=0,nan=0; double md=0; for(int j=0;j<q.rows;j++){ if(!(rb[j]==rb[j])) nan++; if(memcmp(&ra[j],&rb[j],4)) nd++; double d=(double)ra[j]-rb[j]; md=fmax(md,fabs(d)/fmax(1e-30,fabs((double)ra[j]))); }
  printf("ring1 vs launch-per-matrix, Q%d_K %dx%d: %d of %d rows differ, %d unwritten/NaN, largest row rel %.3g\n",q.ty,q.rows,q.cols,nd,q.rows,nan,md); }
 for(size_t i=0;i<5;i++) rm[i].y=yr+i*32768;
 cudaEvent_t f0,f1; CK(cudaEventCreate(&f0)); CK(cudaEventCreate(&f1));
 auto tok=[&](){ for(auto& m:rm) one(m); };
 tok(); CK(cudaStreamSynchronize(st)); std::vector<float> ts;
 for(int r=0;r<9;r++){ CK(cudaEventRecord(f0,st)); tok(); CK(cudaEventRecord(f1,st)); CK(cudaEventSynchronize(f1)); float ms; CK(cudaEventElapsedTime(&ms,f0,f1)); ts.push_back(ms); }
 std::sort(ts.begin(),ts.end()); printf("ring1<%d,%dK> (a launch per matrix, PDL) token from a stream: median %.3f ms (%.2f TB/s), best %.3f\n",NW,RB>>10,ts[4],total/(ts[4]*1e-3)/1e12,ts[0]);
 cudaGraph_t g; cudaGraphExec_t ge; CK(cudaStreamBeginCapture(st,cudaStreamCaptureModeGlobal)); tok(); CK(cudaStreamEndCapture(st,&g)); CK(cudaGraphInstantiate(&ge,g,0)); CK(cudaGraphLaunch(ge,st)); CK(cudaStreamSynchronize(st));
 ts.clear(); for(int r=0;r<9;r++){ CK(cudaEventRecord(f0,st)); CK(cudaGraphLaunch(ge,st)); CK(cudaEventRecord(f1,st)); CK(cudaEventSynchronize(f1)); float ms; CK(cudaEventElapsedTime(&ms,f0,f1)); ts.push_back(ms); }
 std::sort(ts.begin(),ts.end()); printf("ring1<%d,%dK> token as a graph: median %.3f ms (%.2f TB/s), best %.3f\n",NW,RB>>10,ts[4],total/(ts[4]*1e-3)/1e12,ts[0]); fflush(stdout);
 CK(cudaFree(yr)); }
int main(int argc,char**argv){
 cudaDeviceProp pr; CK(cudaGetDeviceProperties(&pr,0)); printf("device %s, %d SMs, L2 %d MB\n",pr.name,pr.multiProcessorCount,pr.l2CacheSize>>20);
 const int LY=40; std::vector<Mat> mats; size_t total=0;
 int shapes[5][3]={{4,10240,5120},{6,5120,5120},{4,5120,5120},{4,27648,5120},{6,5120,13824}};
 for(int l=0;l<LY;l++) for(auto&s:shapes){Mat m{s[0],s[1],s[2],nullptr,0}; m.bytes=(size_t)m.rows*(m.cols/256)*(m.ty==6?210:144); CK(cudaMalloc(&m.w,m.bytes)); fill_random(m.w,m.bytes,(u32)mats.size()); total+=m.bytes; mats.push_back(m);}
 printf("weights %.2f GB in %zu matrices\n",total/1e9,mats.size());
 const int MAXC=32768; i8* xq; float* xd; int* xs; float *y; CK(cudaMalloc(&xq,MAXC)); CK(cudaMalloc(&xd,MAXC/256*4)); CK(cudaMalloc(&xs,MAXC/16*4)); CK(cudaMalloc(&y,65536*4));
 CK(cudaMemset(xq,1,MAXC)); CK(cudaMemset(xd,0,MAXC/256*4)); CK(cudaMemset(xs,0,MAXC/16*4));
 cudaStream_t st; CK(cudaStreamCreateWithFlags(&st,cudaStreamNonBlocking));
 { // p4tma against p4base on hashed bytes: the same sums, so bit for bit the same outputs
  const Mat& m=mats[2]; std::vector<u8> hw(m.bytes); for(size_t i=0;i<hw.size();i++){u32 h=(u32)i*2654435761u; h^=h>>15; hw[i]=(u8)h;}
  for(size_t b=0;b<hw.size();b+=144){hw[b+1]&=0x3b; hw[b+3]&=0x3b;} // finite f16 d and dmin
  CK(cudaMemcpy(m.w,hw.data(),m.bytes,cudaMemcpyHostToDevice));
  std::vector<i8> hq(MAXC); for(int i=0;i<MAXC;i++) hq[i]=(i8)((i*37)%255-127); std::vector<float> hd(MAXC/256,0.01f); std::vector<int> hs(MAXC/16); for(int i=0;i<MAXC/16;i++) hs[i]=i%97-48;
  CK(cudaMemcpy(xq,hq.data(),MAXC,cudaMemcpyHostToDevice)); CK(cudaMemcpy(xd,hd.data(),hd.size()*4,cudaMemcpyHostToDevice)); CK(cudaMemcpy(xs,hs.data(),hs.size()*4,cudaMemcpyHostToDevice));
  std::vector<float> a(m.rows),b(m.rows);
  launch(m,V_BASE,xq,xd,xs,y,st); CK(cudaStreamSynchronize(st)); CK(cudaMemcpy(a.data(),y,m.rows*4,cudaMemcpyDeviceToHost));
  CK(cudaMemset(y,0,m.rows*4)); launch(m,V_TMA,xq,xd,xs,y,st); CK(cudaStreamSynchronize(st)); CK(cudaMemcpy(b.data(),y,m.rows*4,cudaMemcpyDeviceToHost));
  int ndiff=0; double md=0; for(int i=0;i<m.rows;i++) if(memcmp(&a[i],&b[i],4)){ndiff++; md=fmax(md,fabs((double)a[i]-b[i])/fmax(1e-30,fabs((double)a[i])));}
  printf("p4tma vs p4base on %d rows: %d rows differ, largest relative difference %.3g (row 0: %.9g vs %.9g)\n",m.rows,ndiff,md,a[0],b[0]);
  // ring_token on layer 0's five matrices (hashed weights) against the launch-per-matrix kernels,
  // then the whole token (200 matrices) as one ring launch, for several consumer warp counts
  for(int i=0;i<5;i++){ const Mat& q=mats[i]; std::vector<u8> hb(q.bytes); for(size_t j=0;j<hb.size();j++){u32 h=(u32)(j+7*i)*2654435761u; h^=h>>13; h*=0x85ebca6bu; h^=h>>16; hb[j]=(u8)h;}
   if(q.ty==4) for(size_t j=0;j<hb.size();j+=144){hb[j+1]&=0x3b; hb[j+3]&=0x3b;}
   else { const size_t NB=(size_t)q.rows*(q.cols/256); for(size_t j=0;j<NB;j++) hb[NB*208+2*j+1]&=0x3b; }
   CK(cudaMemcpy(q.w,hb.data(),q.bytes,cudaMemcpyHostToDevice)); }
  std::vector<std::vector<float>> ref(5); for(int i=0;i<5;i++){ const Mat& q=mats[i]; ref[i].resize(q.rows); launch(q,V_Q6S3,xq,xd,xs,y,st); CK(cudaStreamSynchronize(st)); CK(cudaMemcpy(ref[i].data(),y,q.rows*4,cudaMemcpyDeviceToHost)); }
  // `ring rpt2`: two Q4_K rows per warp sharing activation loads; `ring nosplit`: rows never
  // split over warps (the variants of the fused-decode section's table).
  g_rpt=argc>2 && !strcmp(argv[2],"rpt2") ? 2 : 1; g_split=argc>2 && !strcmp(argv[2],"nosplit") ? 0 : 1;
  if(argc>1 && !strcmp(argv[1],"ring1")){ ring1_runs<16,RING_BYTES,1>(mats,ref,xq,xd,xs,st,pr.multiProcessorCount,total); ring1_runs<8,80*1024,2>(mats,ref,xq,xd,xs,st,pr.multiProcessorCount,total); ring1_runs<16,RING_BYTES,1>(mats,ref,xq,xd,xs,st,pr.multiProcessorCount,total); ring1_runs<8,80*1024,2>(mats,ref,xq,xd,xs,st,pr.multiProcessorCount,total);
   CK(cudaMemset(xq,1,MAXC)); CK(cudaMemset(xd,0,MAXC/256*4)); CK(cudaMemset(xs,0,MAXC/16*4)); for(int i=0;i<5;i++) fill_random(mats[i].w,mats[i].bytes,(u32)i);
   ring1_runs<16,RING_BYTES,1>(mats,ref,xq,xd,xs,st,pr.multiProcessorCount,total);
   for(int var=0;var<6;var+=3){ auto tok=[&](){ for(auto&m:mats) launch(m,var,xq,xd,xs,y,st); }; tok(); CK(cudaStreamSynchronize(st)); cudaEvent_t e0,e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    float best=1e9; for(int r=0;r<5;r++){CK(cudaEventRecord(e0,st)); tok(); CK(cudaEventRecord(e1,st)); CK(cudaEventSynchronize(e1)); float ms; CK(cudaEventElapsedTime(&ms,e0,e1)); best=fminf(best,ms);}
    printf("launch per matrix (%s) token from a stream: best %.3f ms (%.2f TB/s)\n",var==0?"base":"q6s3",best,total/(best*1e-3)/1e12); }
   return 0; }
  g_dots=argc>1 && !strcmp(argv[1],"half");
  ring_runs<16,4,1>(mats,ref,xq,xd,xs,st,pr.multiProcessorCount,total);
  if(argc>1 && !strcmp(argv[1],"half")){ g_half=1; ring_runs<16,4,0>(mats,ref,xq,xd,xs,st,pr.multiProcessorCount,total); g_half=0; return 0; }
  ring_runs<16,4,2>(mats,ref,xq,xd,xs,st,pr.multiProcessorCount,total);
  ring_runs<16,4,4>(mats,ref,xq,xd,xs,st,pr.multiProcessorCount,total);
  ring_runs<12,4,2>(mats,ref,xq,xd,xs,st,pr.multiProcessorCount,total);
  if(argc>1) return 0;
  CK(cudaMemset(xq,1,MAXC)); CK(cudaMemset(xd,0,MAXC/256*4)); CK(cudaMemset(xs,0,MAXC/16*4)); for(int i=0;i<5;i++) fill_random(mats[i].w,mats[i].bytes,(u32)i);
  }
 cudaEvent_t e0,e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
 const char* vn[]={"base","read","all","q6s3","q6s4","tma"};
 for(int pass=0;pass<2;pass++) for(int var=0;var<6;var++){
  g_pdl = pass==0 ? true : false; if(pass==1 && var!=0) continue;
  auto tok=[&](){ for(auto&m:mats) launch(m,var,xq,xd,xs,y,st); };
  tok(); CK(cudaStreamSynchronize(st));
  float best=1e9; for(int r=0;r<5;r++){CK(cudaEventRecord(e0,st)); tok(); CK(cudaEventRecord(e1,st)); CK(cudaEventSynchronize(e1)); float ms; CK(cudaEventElapsedTime(&ms,e0,e1)); best=fminf(best,ms);}
  cudaGraph_t g; cudaGraphExec_t ge; CK(cudaStreamBeginCapture(st,cudaStreamCaptureModeGlobal)); tok(); CK(cudaStreamEndCapture(st,&g)); CK(cudaGraphInstantiate(&ge,g,0));
  CK(cudaGraphLaunch(ge,st)); CK(cudaStreamSynchronize(st));
  float bg=1e9; for(int r=0;r<5;r++){CK(cudaEventRecord(e0,st)); CK(cudaGraphLaunch(ge,st)); CK(cudaEventRecord(e1,st)); CK(cudaEventSynchronize(e1)); float ms; CK(cudaEventElapsedTime(&ms,e0,e1)); bg=fminf(bg,ms);}
  printf("%-5s pdl=%d token: stream %.3f ms (%.2f TB/s)  graph %.3f ms (%.2f TB/s)\n",vn[var],(int)g_pdl,best,total/(best*1e-3)/1e12,bg,total/(bg*1e-3)/1e12); fflush(stdout);
  for(int s=0;s<5;s++){ CK(cudaStreamBeginCapture(st,cudaStreamCaptureModeGlobal)); size_t b=0; for(int l=0;l<LY;l++){launch(mats[l*5+s],var,xq,xd,xs,y,st); b+=mats[l*5+s].bytes;} CK(cudaStreamEndCapture(st,&g)); cudaGraphExec_t gs; CK(cudaGraphInstantiate(&gs,g,0)); CK(cudaGraphLaunch(gs,st)); CK(cudaStreamSynchronize(st));
   float bs=1e9; for(int r=0;r<5;r++){CK(cudaEventRecord(e0,st)); CK(cudaGraphLaunch(gs,st)); CK(cudaEventRecord(e1,st)); CK(cudaEventSynchronize(e1)); float ms; CK(cudaEventElapsedTime(&ms,e0,e1)); bs=fminf(bs,ms);}
   printf("   Q%d_K %6d x %-6d %6.1f MB: %6.2f us each (graph), %.2f TB/s\n",shapes[s][0],shapes[s][1],shapes[s][2],mats[s].bytes/1e6,bs*1e3/LY,b/(bs*1e-3)/1e12); fflush(stdout);}
 }
 return 0;}
