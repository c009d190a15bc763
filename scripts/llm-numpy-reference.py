#!/usr/bin/env python3
# Exact float64 forward pass of a Llama GGUF (Q4_1/Q8_0/F32 tensors) with
# numpy: the independent reference for osprey's LLM runtime. Writes, for
# every teacher-forced text in the llama.cpp reference, the argmax, the
# top-5 (token, logit) and the first 16 logits of every position.
#   python3 scripts/llm-numpy-reference.py MODEL.gguf REFERENCE.json OUT.json
#
# Regenerate tests/fixtures/smollm2_numpy_f64_reference.json with it after
# scripts/fetch-llm.sh (needs numpy only).
import json
import struct
import sys

import numpy as np
f=open(sys.argv[1],'rb'); buf=f.read()
pos=0
def rd(fmt):
    global pos
    v=struct.unpack_from('<'+fmt,buf,pos); pos+=struct.calcsize('<'+fmt); return v
magic,ver,nt,nkv=rd('IIQQ')
def rs():
    n,=rd('Q'); global pos; s=buf[pos:pos+n].decode('utf8','replace'); pos+=n; return s
fmt={0:'B',1:'b',2:'H',3:'h',4:'I',5:'i',6:'f',7:'?',10:'Q',11:'q',12:'d'}
def rv(t):
    if t==8: return rs()
    if t==9:
        et,n=rd('IQ'); return [rv(et) for _ in range(n)]
    return rd(fmt[t])[0]
meta={}
for i in range(nkv):
    k=rs(); t,=rd('I'); meta[k]=rv(t)
tens={}
for i in range(nt):
    name=rs(); nd,=rd('I'); dims=rd('Q'*nd); ty,off=rd('IQ'); tens[name]=(dims,ty,off)
start=(pos+31)//32*32
def load(name):
    dims,ty,off=tens[name]; n=int(np.prod(dims)); o=start+off
    if ty==0: a=np.frombuffer(buf,np.float32,n,o).astype(np.float64)
    elif ty==8:
        nb=n//32; raw=np.frombuffer(buf,np.uint8,nb*34,o).reshape(nb,34)
        d=raw[:,:2].copy().view(np.float16).astype(np.float64); q=raw[:,2:].view(np.int8).astype(np.float64)
        a=(d*q).reshape(-1)
    elif ty==3:
        nb=n//32; raw=np.frombuffer(buf,np.uint8,nb*20,o).reshape(nb,20)
        d=raw[:,0:2].copy().view(np.float16).astype(np.float64); m=raw[:,2:4].copy().view(np.float16).astype(np.float64)
        qs=raw[:,4:]; lo=(qs&15).astype(np.float64); hi=(qs>>4).astype(np.float64)
        a=(np.concatenate([lo,hi],1)*d+m).reshape(-1)
    return a.reshape(list(reversed(dims)))

ref=json.load(open(sys.argv[2]))
out={"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "method": "numpy float64, weights dequantized exactly, no activation quantization", "cases": []}
dim=meta['llama.embedding_length']; nh=meta['llama.attention.head_count']; nkvh=meta['llama.attention.head_count_kv']
hd=dim//nh; L=meta['llama.block_count']; eps=meta['llama.attention.layer_norm_rms_epsilon']; base=meta['llama.rope.freq_base']
E=load('token_embd.weight')
W={}
def w(n):
    if n not in W: W[n]=load(n)
    return W[n]
def rms(x,g): return x/np.sqrt((x*x).mean(-1,keepdims=True)+eps)*g
inv=base**(-np.arange(0,hd,2)/hd)
for case in ref['teacher_forced']:
    ids=case['ids']; T=len(ids)
    def rope(v,nheads):
        v=v.reshape(T,nheads,hd).copy()
        ang=np.arange(T)[:,None]*inv[None,:]
        c=np.cos(ang)[:,None,:]; s=np.sin(ang)[:,None,:]
        a=v[...,0::2].copy(); b=v[...,1::2].copy()
        v[...,0::2]=a*c-b*s; v[...,1::2]=a*s+b*c
        return v
    x=E[ids]
    for l in range(L):
        p=f'blk.{l}.'
        h=rms(x,w(p+'attn_norm.weight'))
        q=rope(h@w(p+'attn_q.weight').T,nh); k=rope(h@w(p+'attn_k.weight').T,nkvh); v=(h@w(p+'attn_v.weight').T).reshape(T,nkvh,hd)
        o=np.zeros((T,nh,hd))
        for hh in range(nh):
            kh=hh//(nh//nkvh)
            sc=q[:,hh,:]@k[:,kh,:].T/np.sqrt(hd)+np.triu(np.full((T,T),-np.inf),1)
            pr=np.exp(sc-sc.max(1,keepdims=True)); pr/=pr.sum(1,keepdims=True)
            o[:,hh,:]=pr@v[:,kh,:]
        x=x+o.reshape(T,dim)@w(p+'attn_output.weight').T
        h=rms(x,w(p+'ffn_norm.weight'))
        g=h@w(p+'ffn_gate.weight').T; u=h@w(p+'ffn_up.weight').T
        x=x+(g/(1+np.exp(-g))*u)@w(p+'ffn_down.weight').T
    logits=rms(x,w('output_norm.weight'))@E.T
    top=np.argsort(-logits,1,kind='stable')[:,:5]
    out["cases"].append({"ids": ids, "argmax": logits.argmax(1).tolist(),
        "top5": [[[int(t), float(logits[i,t])] for t in top[i]] for i in range(T)],
        "first16": [[float(v) for v in logits[i,:16]] for i in range(T)]})
json.dump(out, open(sys.argv[3],'w'), indent=None)
print("wrote", sys.argv[3])
