// Stand-alone harness: the five decode mat-vecs of each of a 13B's 40 layers (Q4_K q/k,
// Q6_K v, Q4_K output, Q4_K gate/up, Q6_K down; 8.14 GB of random weights, so L2 serves none
// of it), launched back to back as flea launches them (128-thread blocks, one warp per row,
// programmatic dependent launch, weights prefetched before the wait), from a stream and as a
// CUDA graph; also with a plain read of the same bytes in the same grids, and variants (`tma`:
// each block's Q4_K rows fetched into shared memory by one bulk copy, checked against the
// register kernel's outputs first).
// The kernels restate flea's (crates/flea-cuda/src/kernels.cu) compactly; Q6_K in the
// repacked layout of resident weights. Numbers: docs/BENCHMARKS.md ("fewer dependent round
// trips per layer"; "prompt attention in tiles; two decode ideas that did not pay").
//   nvcc -O3 -std=c++17 -arch=sm_90 -o matvec_layers scripts/gpu_matvec_layers.cu && ./matvec_layers
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#include <cuda_runtime.h>
typedef unsigned char u8; typedef signed char i8; typedef unsigned short u16; typedef unsigned int u32;
#define CK(x) do{cudaError_t e=(x); if(e!=cudaSuccess){printf("CUDA %s at %d\n",cudaGetErrorString(e),__LINE__); exit(1);}}while(0)
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
int main(int argc,char**argv){
 cudaDeviceProp pr; CK(cudaGetDeviceProperties(&pr,0)); printf("device %s, %d SMs, L2 %d MB\n",pr.name,pr.multiProcessorCount,pr.l2CacheSize>>20);
 const int LY=40; std::vector<Mat> mats; size_t total=0;
 int shapes[5][3]={{4,10240,5120},{6,5120,5120},{4,5120,5120},{4,27648,5120},{6,5120,13824}};
 for(int l=0;l<LY;l++) for(auto&s:shapes){Mat m{s[0],s[1],s[2],nullptr,0}; m.bytes=(size_t)m.rows*(m.cols/256)*(m.ty==6?210:144); CK(cudaMalloc(&m.w,m.bytes)); CK(cudaMemset(m.w,0x11,m.bytes)); total+=m.bytes; mats.push_back(m);}
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
  CK(cudaMemset(xq,1,MAXC)); CK(cudaMemset(xd,0,MAXC/256*4)); CK(cudaMemset(xs,0,MAXC/16*4)); CK(cudaMemset(m.w,0x11,m.bytes)); } cudaEvent_t e0,e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
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
